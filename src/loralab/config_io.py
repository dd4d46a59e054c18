"""Config plumbing that knows no loralab key: YAML files, `a.b=value` overrides, dotted access,
and building typed dataclasses from mappings with checked values (`loralab.config` holds the
keys themselves). No torch import, as for `loralab.config`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from loralab.errors import UserError


class DuplicateKeyError(yaml.YAMLError):
    """A mapping names a key twice (PyYAML keeps the last one without a word)."""

    def __init__(self, key: str, line: int) -> None:
        super().__init__(f"duplicate key {key} (line {line}): the second would silently win")
        self.key, self.line = key, line


def load_yaml(text: str) -> Any:
    """yaml.safe_load, except that a key given twice in one mapping is an error naming it
    (dotted, e.g. `train.lr`). Merge keys (`<<`) keep their YAML meaning."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_duplicates(node, "")
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _check_duplicates(node: yaml.Node, prefix: str, seen_nodes: set[int] | None = None) -> None:
    seen_nodes = set() if seen_nodes is None else seen_nodes
    if id(node) in seen_nodes:  # an alias to a node already checked
        return
    seen_nodes.add(id(node))
    if isinstance(node, yaml.MappingNode):
        keys: set[Any] = set()
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else id(key_node)
            name = f"{prefix}{key}"
            if key in keys:
                raise DuplicateKeyError(name, key_node.start_mark.line + 1)
            keys.add(key)
            _check_duplicates(value_node, f"{name}.", seen_nodes)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _check_duplicates(item, f"{prefix.rstrip('.')}[{i}].", seen_nodes)


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """A YAML file whose top level is a mapping; one-line errors for the rest."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file not found: {p}")
    try:
        raw = load_yaml(p.read_text(encoding="utf-8"))
    except DuplicateKeyError as exc:
        raise UserError(f"{p}: {exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise UserError(f"{p} is not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read config file {p}: {exc}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise UserError(f"{p} must hold a mapping of config keys, got {type(raw).__name__}")
    return raw


def is_relative_file_path(value: str) -> bool:
    return not (value.startswith(("builtin:", "/", "~")) or "://" in value)


def parse_override(item: str) -> tuple[str, Any]:
    """`a.b=value` with the value read as YAML (so 1e-4, null, [1, 2] and true work)."""
    if "=" not in item:
        raise UserError(f"override {item!r} must look like key=value (e.g. lora.r=16)")
    key, _, text = item.partition("=")
    key = key.strip()
    if not key:
        raise UserError(f"override {item!r} has no key")
    return key, parse_scalar(text)


def parse_scalar(text: str) -> Any:
    try:
        value = load_yaml(text) if text.strip() else ""
    except DuplicateKeyError as exc:
        raise UserError(f"value {text!r}: {exc}") from None
    except yaml.YAMLError:
        return text
    # YAML 1.1 reads 1e-4 as a string; people mean a number.
    if isinstance(value, str):
        try:
            return float(value) if any(c in value.lower() for c in ".e") else int(value)
        except ValueError:
            return value
    return value


def get_dotted(raw: dict[str, Any], key: str) -> Any:
    node: Any = raw
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise UserError(f"cannot set {key}: {part} is not a section")
        node = child
    node[parts[-1]] = value


def unknown_key_message(key: str, keys: list[str], aliases: dict[str, str] | None = None) -> str:
    """'unknown config key X; did you mean Y?', or for a name another tool uses for one of
    loralab's keys (`aliases`: its last dotted part → loralab's key) that key, named."""
    alias = (aliases or {}).get(key.rsplit(".", 1)[-1])
    if alias is not None and alias != key:
        return f"unknown config key {key}: loralab calls it {alias}"
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]}?" if close else ""
    return f"unknown config key {key}{hint}"


def build_dataclass(cls: type, raw: Any, prefix: str, all_keys: list[str],
                    aliases: dict[str, str] | None = None) -> Any:
    """cls(**raw), nested dataclasses built from nested mappings, every value checked against its
    annotation; a key cls lacks is an error naming the nearest of `all_keys`."""
    if not isinstance(raw, dict):
        raise UserError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {raw!r}")
    names = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in names:
            raise UserError(unknown_key_message(prefix + str(key), all_keys, aliases))
    kwargs = {}
    switches = getattr(cls, "SWITCHES", ())
    for name, value in raw.items():
        ftype = field_type(cls, name)
        if name in switches and isinstance(value, bool):
            value = "on" if value else "off"  # YAML reads on/off as booleans
        if dataclasses.is_dataclass(ftype):
            kwargs[name] = build_dataclass(ftype, value or {}, prefix + name + ".", all_keys,
                                           aliases)
        else:
            kwargs[name] = _coerce(prefix + name, value, ftype)
    return cls(**kwargs)


def field_type(cls: type, name: str) -> Any:
    return typing.get_type_hints(cls)[name]


def _coerce(key: str, value: Any, ftype: Any) -> Any:
    """Check (and gently convert) a value against its annotated type."""
    origin = typing.get_origin(ftype)
    args = typing.get_args(ftype)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) > 1:  # e.g. str | list: the member whose kind the value has
            for member in inner:
                if isinstance(value, typing.get_origin(member) or member):
                    return _coerce(key, value, member)
            kinds = " or ".join(getattr(typing.get_origin(m) or m, "__name__", str(m)) for m in inner)
            raise UserError(f"{key} must be a {kinds}, got {_shown(value)}")
        return _coerce(key, value, inner[0])
    if origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise UserError(f"{key} must be a list, got {value!r}")
        return [_coerce(key, v, args[0]) for v in value]
    if ftype is bool:
        if isinstance(value, bool):
            return value
        raise UserError(f"{key} must be true or false, got {value!r}")
    if ftype is int:
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"{key} must be a finite integer, got {value!r}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise UserError(f"{key} must be an integer, got {_shown(value)}")
        return int(value)
    if ftype is float:
        if isinstance(value, str):
            value = parse_scalar(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{key} must be a number, got {_shown(value)}")
        if not math.isfinite(value):
            raise UserError(f"{key} must be a finite number, got {value!r}")
        return float(value)
    if ftype is str:
        if not isinstance(value, str):
            raise UserError(f"{key} must be a string, got {_shown(value)}"
                            + (": quote it" if isinstance(value, (bool, int, float)) else ""))
        return value
    return value


def _shown(value: Any) -> str:
    """A value with the YAML type it was read as, so `yes` read as True is not a mystery."""
    if isinstance(value, bool):
        return f"{value!r} (YAML reads yes/no/on/off/true/false as a boolean)"
    if isinstance(value, (int, float)):
        return f"{value!r} (a number in YAML)"
    if isinstance(value, (dict, list)):
        return f"a {'mapping' if isinstance(value, dict) else 'list'} ({value!r})"[:200]
    return repr(value)[:200]

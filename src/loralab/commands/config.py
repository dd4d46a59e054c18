"""`loralab config CONFIG [key=value ...]`: the resolved config as YAML, each value commented
with where it came from (default, file, override). Loads no model, data or torch."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import yaml


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "config",
        help="print the resolved config (YAML) and where each value came from",
        description="Read CONFIG and the key=value overrides as `loralab train` does, validate, "
        "and print the final YAML; each line says whether the value is a default, from the "
        "file or from an override. Example: loralab config configs/demo.yaml lora.r=16",
    )
    p.add_argument("config", help="YAML config (see configs/)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. lora.r=16 train.lr=2e-4")
    p.set_defaults(func=cmd_config)


def cmd_config(args: argparse.Namespace) -> int:
    print(render(args.config, args.overrides), end="")
    return 0


def render(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> str:
    from loralab.config import load_config, parse_override, read_yaml_mapping

    cfg = load_config(path, overrides)  # every check `loralab train` makes
    from_file = set(_flat_keys(read_yaml_mapping(path)))
    from_cli = {parse_override(item)[0] for item in overrides}
    lines = [f"# loralab config {path}" + "".join(f" {o}" for o in overrides), ""]
    for name, value in cfg.to_dict().items():
        if isinstance(value, dict):
            lines.append(f"{name}:")
            for key, inner in value.items():
                dotted = f"{name}.{key}"
                lines.append(f"  {key}: {_scalar(inner)}  # {_origin(dotted, from_file, from_cli)}")
        else:
            lines.append(f"{name}: {_scalar(value)}  # {_origin(name, from_file, from_cli)}")
    return "\n".join(lines) + "\n"


def _origin(key: str, from_file: set[str], from_cli: set[str]) -> str:
    if key in from_cli or any(key.startswith(k + ".") for k in from_cli):
        return "override"
    if key in from_file or any(key.startswith(k + ".") for k in from_file):
        return "file"
    return "default"


def _flat_keys(raw: dict[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for k, v in raw.items():
        if isinstance(v, dict) and v:
            keys += _flat_keys(v, f"{prefix}{k}.")
        else:
            keys.append(f"{prefix}{k}")
    return keys


def _scalar(value: Any) -> str:
    """The value as inline YAML that reads back as the same value."""
    text = yaml.safe_dump(value, default_flow_style=True, allow_unicode=True, width=10_000)
    return text.removesuffix("\n").removesuffix("\n...").strip()


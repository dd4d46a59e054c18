"""Resolve a base model (local folder, HF hub, ModelScope, builtin tiny model) and load it."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loralab.errors import UserError

if TYPE_CHECKING:
    import torch

    from loralab.config import ModelConfig

BUILTIN_PREFIX = "builtin:"
# The CPU demo and test model: Qwen2 architecture, random weights, the real Qwen2.5 vocabulary.
TINY_QWEN2 = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=151936,
    tie_word_embeddings=True,
    max_position_embeddings=4096,
    rope_theta=1_000_000.0,
    rms_norm_eps=1e-6,
)
TINY_SEED = 1234
BASE_REVISION_ATTR = "loralab_base_revision"  # the hub commit a base model was loaded at


def resolve_model_path(model_cfg: ModelConfig) -> str:
    """A local folder holding the model: builtin models are built once, hub ids downloaded."""
    path = model_cfg.path
    if path.startswith(BUILTIN_PREFIX):
        return str(builtin_model_dir(path[len(BUILTIN_PREFIX) :]))
    local = Path(path).expanduser()
    if model_cfg.source in ("auto", "local") and local.is_dir():
        return str(model_folder(local))
    if model_cfg.source == "local":
        raise UserError(f"model.path {path} is not a folder (model.source=local)")
    if model_cfg.source == "modelscope":
        return _from_modelscope(path)
    return _from_hf_hub(path)


def model_folder(local: Path) -> Path:
    """A local HF model folder, resolved; one line when it is not one."""
    if not (local / "config.json").is_file():
        raise UserError(f"model folder {local} has no config.json: is it a HF model folder?")
    return local.resolve()


def _from_modelscope(model_id: str) -> str:
    try:
        from modelscope import snapshot_download
    except ImportError:
        raise UserError(
            "model.source=modelscope needs the modelscope package: pip install modelscope"
        ) from None
    try:
        return str(snapshot_download(model_id))
    except Exception as exc:  # network, unknown id: say what was looked for
        raise UserError(
            f"could not get {model_id} from ModelScope ({type(exc).__name__}): {exc}"
        ) from None


def _from_hf_hub(model_id: str) -> str:
    """The model's local snapshot: the HF cache first, the hub only when it can be reached."""
    from loralab.model import hub

    hub.require_hub_id(model_id)
    online = hub.prepare_hub()  # before huggingface_hub is imported: it reads offline mode then
    from huggingface_hub import snapshot_download

    try:  # the local HF cache first: no network needed when it was downloaded before
        return snapshot_download(model_id, local_files_only=True)
    except Exception:
        pass
    if not online:
        raise UserError(hub.missing_model_message(model_id, hub.offline_reason()))
    try:
        return snapshot_download(
            model_id, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"]
        )
    except Exception as exc:
        why = f"the hub download failed ({type(exc).__name__})"
        raise UserError(hub.missing_model_message(model_id, why)) from None


def loaded_from_hub(model_cfg: ModelConfig) -> bool:
    """Whether resolve_model_path takes model.path as an HF hub id (not a folder, not builtin)."""
    path = model_cfg.path
    if path.startswith(BUILTIN_PREFIX) or model_cfg.source in ("local", "modelscope"):
        return False
    return not Path(path).expanduser().is_dir()


def snapshot_revision(folder: str) -> str | None:
    """The commit of an HF cache snapshot folder (`.../models--org--name/snapshots/<commit>`)."""
    p = Path(folder)
    if p.parent.name == "snapshots" and p.parent.parent.name.startswith("models--"):
        return p.name
    return None


def keep_hub_identity(model: Any, hub_id: str, folder: str) -> None:
    """Adapters saved from `model` name the hub id and commit, not the local cache folder
    (which loads nowhere else). PEFT copies `name_or_path` into base_model_name_or_path;
    attach_lora passes BASE_REVISION_ATTR on as the adapter's `revision`."""
    model.name_or_path = hub_id
    model.config._name_or_path = hub_id
    setattr(model, BASE_REVISION_ATTR, snapshot_revision(folder))


def resolve_tokenizer_path(model_cfg: ModelConfig) -> str:
    """Where the tokenizer comes from, without downloading or building any weights."""
    path = model_cfg.path
    if path.startswith(BUILTIN_PREFIX):
        from loralab.model.tokenizer import builtin_tokenizer_dir

        builtin_model_name(path)  # unknown builtin names fail here too
        return str(builtin_tokenizer_dir())
    local = Path(path).expanduser()
    if local.is_dir():
        return str(model_folder(local))
    if model_cfg.source == "local":
        raise UserError(f"model.path {path} is not a folder (model.source=local)")
    if model_cfg.source != "modelscope":  # offline and not cached: one line now, no retries
        from loralab.model.hub import require_reachable_or_cached

        require_reachable_or_cached(path, "tokenizer_config.json")
    return path  # a hub id: AutoTokenizer fetches only the tokenizer files


def builtin_model_name(path: str) -> str:
    name = path[len(BUILTIN_PREFIX) :]
    if name != "tiny-qwen2":
        raise UserError(f"unknown builtin model {name!r}; known: builtin:tiny-qwen2")
    return name


def builtin_model_path(path: str) -> Path:
    """Where `builtin:NAME` is (or will be) built, without building it."""
    from loralab.model.tokenizer import loralab_cache

    return loralab_cache() / "models" / builtin_model_name(path)


def builtin_model_dir(name: str) -> Path:
    """Build a builtin model folder once (atomically) and return it."""
    target = builtin_model_path(BUILTIN_PREFIX + name)
    if (target / "model.safetensors").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=target.parent))
    try:
        _write_tiny_qwen2(tmp)
        if target.exists():  # a half-built folder from an older version
            shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "model.safetensors").is_file():
            raise
    return target


def _write_tiny_qwen2(folder: Path) -> None:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from loralab.model.tokenizer import builtin_tokenizer_dir

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        model = Qwen2ForCausalLM(Qwen2Config(**TINY_QWEN2))
    model.save_pretrained(folder, safe_serialization=True)
    for item in builtin_tokenizer_dir().iterdir():
        shutil.copy(item, folder / item.name)
    (folder / "loralab_builtin.json").write_text(json.dumps({"name": "tiny-qwen2", **TINY_QWEN2}))


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """auto: bf16 on a GPU that has it, else fp32 (bf16 on CPU is slow and gains nothing here)."""
    import torch

    if name == "bf16":
        return torch.bfloat16
    if name == "fp16":
        return torch.float16
    if name == "fp32":
        return torch.float32
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def load_tokenizer_for(model_path: str) -> Any:
    from loralab.model.tokenizer import load_tokenizer

    try:
        return load_tokenizer(model_path)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load a tokenizer from {model_path}: {exc}") from None


def load_base_model(
    model_cfg: ModelConfig, device: torch.device | str | None = None, dtype: str | None = None
) -> tuple[Any, Any]:
    """(model, tokenizer) on `device`, frozen, in the chosen dtype, eval mode."""
    import torch
    from transformers import AutoModelForCausalLM

    from loralab.model.quiet import quiet_hf

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    path = resolve_model_path(model_cfg)
    tokenizer = load_tokenizer_for(path)
    torch_dtype = pick_dtype(dtype or model_cfg.dtype, device)
    try:
        with quiet_hf():
            model = AutoModelForCausalLM.from_pretrained(
                path,
                dtype=torch_dtype,
                attn_implementation=model_cfg.attn_implementation,
                trust_remote_code=model_cfg.trust_remote_code,
            )
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load model from {path}: {exc}") from None
    if loaded_from_hub(model_cfg):
        keep_hub_identity(model, model_cfg.path, path)
    model.to(device)
    model.requires_grad_(False)
    model.eval()
    model.config.use_cache = False
    return model, tokenizer

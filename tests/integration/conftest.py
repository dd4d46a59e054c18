"""CLI and loop tests on CPU: a tiny random Qwen2 model, the real Qwen2.5 tokenizer, bundled data."""

from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path

import pytest

DATA_DIR = Path(str(resources.files("loralab") / "resources" / "data"))


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory):
    """Builtin models and tokenizers are built into a per-session cache, not the user's."""
    cache = tmp_path_factory.mktemp("loralab-cache")
    old = os.environ.get("LORALAB_CACHE")
    os.environ["LORALAB_CACHE"] = str(cache)
    yield cache
    if old is None:
        os.environ.pop("LORALAB_CACHE", None)
    else:
        os.environ["LORALAB_CACHE"] = old


@pytest.fixture(scope="session")
def small_data(tmp_path_factory) -> Path:
    """The first 16 bundled eval records: enough for one bs16 step or four bs4 steps."""
    rows = json.loads((DATA_DIR / "tag_scores_eval.json").read_text(encoding="utf-8"))[:16]
    path = tmp_path_factory.mktemp("data") / "small.json"
    path.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    return path


@pytest.fixture
def overrides(small_data, tmp_path):
    """Dotted overrides for a fast CPU run into tmp_path/run."""
    return [
        f"data.path={small_data}",
        f"output_dir={tmp_path / 'run'}",
        "tracking.backend=none",
        "train.max_steps=2",
        "train.lr=2e-3",  # pinned: the golden losses must not move when the demo's lr does
        "train.batch_size=4",
        "train.grad_accum=2",
        "data.max_length=256",
    ]


@pytest.fixture(scope="session")
def tiny_base(isolated_cache):
    """One loaded tiny base model for the in-process tests (the loop leaves it clean)."""
    import torch

    from loralab.commands.train import demo_config_path
    from loralab.config import load_config
    from loralab.model.load import load_base_model
    from loralab.train.loop import Base

    cfg = load_config(demo_config_path())
    model, tokenizer = load_base_model(cfg.model, "cpu")
    return Base(model, tokenizer, torch.device("cpu"))


PROBE = [[151644, 8948, 198, 108386, 151645, 198, 151644, 77091, 198]]


@pytest.fixture
def assert_reloads_in_plain_peft():
    """The check below, as a fixture (test modules cannot import conftest)."""
    return _assert_reloads_in_plain_peft


def _assert_reloads_in_plain_peft(peft_model, run_dir: Path) -> None:
    """The adapter saved in run_dir, loaded with plain PEFT on a fresh base, gives the trained
    model's logits. Unloads `peft_model` (the shared tiny base must be left clean)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    probe = torch.tensor(PROBE)
    peft_model.eval()
    with torch.no_grad():
        expected = peft_model(input_ids=probe).logits
    peft_model.unload()
    adapter_cfg = json.loads((run_dir / "adapter_config.json").read_text())
    fresh = AutoModelForCausalLM.from_pretrained(adapter_cfg["base_model_name_or_path"])
    with torch.no_grad():
        plain = fresh(input_ids=probe).logits
    reloaded = PeftModel.from_pretrained(fresh, str(run_dir)).eval()
    with torch.no_grad():
        got = reloaded(input_ids=probe).logits
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()
    assert not torch.allclose(plain, expected, atol=1e-5), "the adapter must change the logits"


@pytest.fixture(scope="session")
def train_tiny_run(tmp_path_factory, small_data, tiny_base):
    """`train_tiny_run(name, *overrides)`: a 2-step run of the demo config on the small data,
    trained in-process on the shared tiny base into a fresh folder; returns (run dir, config).
    Overrides may name the small data's path as {small_data} (e.g. for data.eval_path)."""
    from loralab.commands.train import demo_config_path
    from loralab.config import load_config
    from loralab.train.loop import train_run

    def train(name: str, *overrides: str):
        run = tmp_path_factory.mktemp(name) / "run"
        cfg = load_config(demo_config_path(), [
            f"data.path={small_data}", f"output_dir={run}",
            "tracking.backend=none", "train.max_steps=2", "train.batch_size=4",
            "train.grad_accum=1", "data.max_length=256",
            *(o.format(small_data=small_data) for o in overrides),
        ])
        train_run(cfg, base=tiny_base, show_progress=False)
        return run, cfg

    return train

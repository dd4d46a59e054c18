"""A tiny random Qwen2 (lively: its greedy tokens vary), two PEFT adapters of it, servers on
127.0.0.1 built around them in-process, and schedulers driven by hand."""

from __future__ import annotations

import pytest

SYSTEM = "You answer in tags."


@pytest.fixture(scope="session")
def serve_model(make_lively_model):
    """The servers' own lively model (the naive engine wraps its layers while it serves)."""
    return make_lively_model()


@pytest.fixture(scope="session")
def adapter_dirs(serve_model, save_adapter, tmp_path_factory):
    """{name: folder}: two PEFT adapters with random non-zero B; `tagger` has a run config
    with a training system prompt."""
    specs = {"tagger": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
             "other": dict(r=2, lora_alpha=4, target_modules=["k_proj", "o_proj", "up_proj"])}
    out = {name: save_adapter(serve_model, tmp_path_factory.mktemp(name), seed + 1, **spec)
           for seed, (name, spec) in enumerate(specs.items())}
    (out["tagger"] / "config.yaml").write_text(f"data:\n  system_prompt: {SYSTEM}\n")
    return out


@pytest.fixture()
def make_server(serve_model, qwen_tokenizer, adapter_dirs):
    """make_server(**ServeOptions fields, adapters=[names]) -> a started RunningServer."""
    from loralab.serve.server import RunningServer, ServeOptions, build_state

    started = []

    def make(adapters=("tagger", "other"), **options):
        opts = ServeOptions(**{"max_rows": 8, "max_len": 256, "default_max_tokens": 16,
                               **options})
        state = build_state(serve_model, qwen_tokenizer, "base", "",
                            [(n, adapter_dirs[n]) for n in adapters], opts)
        server = RunningServer(state).__enter__()
        started.append(server)
        return server

    yield make
    for server in started:
        server.__exit__(None, None, None)
        peft = getattr(server.state.registry.backend, "peft", None)
        if peft is not None:  # the naive engine wrapped the shared model's layers in place
            peft.unload()


@pytest.fixture()
def client_for():
    def make(server, **kwargs):
        from openai import OpenAI

        return OpenAI(base_url=server.url + "/v1", api_key=kwargs.pop("api_key", "none"),
                      max_retries=0, timeout=60, **kwargs)

    return make


@pytest.fixture()
def scheduler_for(serve_model, adapter_dirs):
    """scheduler_for(loaded, prefill_chunk=0) -> a Scheduler (not started) over a fresh batch
    with adapters {id: name} loaded; its _admit and _step are driven by hand."""
    from loralab.engine.continuous import ContinuousBatch
    from loralab.engine.lora_weights import read_lora
    from loralab.serve.metrics import Metrics
    from loralab.serve.scheduler import Scheduler

    def make(loaded, prefill_chunk=0):
        batch = ContinuousBatch(serve_model, max_rows=6, max_len=48)
        batch.set_adapters({k: read_lora(adapter_dirs[name], serve_model)[0]
                            for k, name in loaded.items()})
        return Scheduler(batch, [-1], 8, Metrics(), prefill_chunk)

    return make

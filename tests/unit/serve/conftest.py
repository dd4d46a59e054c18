"""A tiny random Qwen2 (lively: its greedy tokens vary), two PEFT adapters of it, and servers
on 127.0.0.1 built around them in-process."""

from __future__ import annotations

import pytest
import torch

SYSTEM = "You answer in tags."


@pytest.fixture(scope="session")
def serve_model():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=151936,
                      tie_word_embeddings=True, initializer_range=0.5)
    cfg._attn_implementation = "sdpa"
    return Qwen2ForCausalLM(cfg).eval()


@pytest.fixture(scope="session")
def adapter_dirs(serve_model, tmp_path_factory):
    """{name: folder}: two PEFT adapters with random non-zero B; `tagger` has a run config
    with a training system prompt."""
    from peft import LoraConfig, get_peft_model

    specs = {"tagger": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
             "other": dict(r=2, lora_alpha=4, target_modules=["k_proj", "o_proj", "up_proj"])}
    out = {}
    for seed, (name, spec) in enumerate(specs.items()):
        folder = tmp_path_factory.mktemp(name)
        peft_model = get_peft_model(serve_model, LoraConfig(**spec))
        torch.manual_seed(seed + 1)
        for pname, param in peft_model.named_parameters():
            if "lora_B" in pname:
                param.data.normal_(0, 0.3)
        peft_model.save_pretrained(folder)
        peft_model.unload()
        out[name] = folder
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

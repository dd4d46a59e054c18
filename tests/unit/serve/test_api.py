"""The server through the real `openai` client on 127.0.0.1: answers equal the engine's
greedy output for each model alone, streaming, stops, errors in OpenAI's shape."""

from __future__ import annotations

import openai
import pytest

from loralab.data.render import render_prompt
from loralab.engine import GenSettings, generate, stop_token_ids
from loralab.engine.lora_weights import read_lora

from .conftest import SYSTEM

USER = [{"role": "user", "content": "tag: cloud computing and AI"}]


def expected_text(model, tokenizer, prompt_ids, folder=None, new=16):
    """The engine's greedy text for one prompt on its own (cut at a stop token)."""
    lora = read_lora(folder, model)[0] if folder else None
    stops = stop_token_ids(tokenizer, model)
    settings = GenSettings(max_new_tokens=new, engine="static", stop_ids=tuple(stops),
                           pad_id=tokenizer.pad_token_id)
    out = generate(model, None, [prompt_ids], settings, lora)[0][0].ids
    cut = next((i for i, t in enumerate(out) if t in stops), len(out))
    return tokenizer.decode(out[:cut], skip_special_tokens=True), cut < len(out)


def chat_ids(tokenizer, system, messages):
    return tokenizer(render_prompt(tokenizer, system, messages),
                     add_special_tokens=False)["input_ids"]


def test_models_and_each_model_answers_with_its_own_greedy_text(
        make_server, client_for, serve_model, qwen_tokenizer, adapter_dirs):
    client = client_for(make_server())
    assert [m.id for m in client.models.list().data] == ["base", "tagger", "other"]
    texts = {}
    for name, system in (("base", None), ("tagger", SYSTEM), ("other", None)):
        reply = client.chat.completions.create(model=name, messages=USER, temperature=0,
                                               max_tokens=16)
        ids = chat_ids(qwen_tokenizer, system, USER)
        want, stopped = expected_text(serve_model, qwen_tokenizer, ids, adapter_dirs.get(name))
        assert reply.choices[0].message.content == want, name
        assert reply.choices[0].finish_reason == ("stop" if stopped else "length")
        assert reply.usage.prompt_tokens == len(ids)
        assert reply.usage.total_tokens == len(ids) + reply.usage.completion_tokens
        texts[name] = want
    assert len(set(texts.values())) == 3  # the adapters change the answer


def test_streaming_gives_the_same_text_and_usage(make_server, client_for):
    client = client_for(make_server())
    whole = client.chat.completions.create(model="tagger", messages=USER, temperature=0)
    chunks = list(client.chat.completions.create(
        model="tagger", messages=USER, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    finish = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finish[-1] == whole.choices[0].finish_reason and not any(finish[:-1])


def test_completions_plain_and_streamed(make_server, client_for, serve_model, qwen_tokenizer):
    client = client_for(make_server())
    prompt = "The capital of France is"
    ids = qwen_tokenizer(prompt, add_special_tokens=False)["input_ids"]
    want, _ = expected_text(serve_model, qwen_tokenizer, ids, new=10)
    reply = client.completions.create(model="base", prompt=prompt, temperature=0, max_tokens=10)
    assert reply.choices[0].text == want
    streamed = client.completions.create(model="base", prompt=ids, temperature=0, max_tokens=10,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == want


def test_stop_strings_cut_the_text(make_server, client_for):
    client = client_for(make_server())
    full = client.completions.create(model="other", prompt="x y z", temperature=0, max_tokens=16)
    text = full.choices[0].text
    assert len(text) > 4
    stop = text[2:4]
    cut = client.completions.create(model="other", prompt="x y z", temperature=0, max_tokens=16,
                                    stop=[stop])
    assert cut.choices[0].text == text[: text.find(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model="other", prompt="x y z", temperature=0,
                                         max_tokens=16, stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == cut.choices[0].text


def test_seeded_sampling_repeats(make_server, client_for):
    client = client_for(make_server())

    def draw(seed):
        return client.completions.create(model="tagger", prompt="a b", temperature=1.0,
                                         top_p=0.9, seed=seed, max_tokens=12).choices[0].text

    assert draw(5) == draw(5)
    assert len({draw(s) for s in range(4)}) > 1


def test_request_errors_have_the_openai_shape(make_server, client_for):
    server = make_server(max_len=64)
    client = client_for(server)
    with pytest.raises(openai.NotFoundError) as exc:
        client.chat.completions.create(model="nope", messages=USER)
    assert exc.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as exc:
        client.completions.create(model="base", prompt="word " * 100, max_tokens=4)
    assert exc.value.body["code"] == "context_length_exceeded"
    for bad in (dict(temperature=5), dict(top_p=0), dict(max_tokens=0), dict(n=2),
                dict(stop=["a", "b", "c", "d", "e"])):
        with pytest.raises(openai.BadRequestError):
            client.completions.create(model="base", prompt="hi", **bad)
    import httpx

    raw = httpx.post(server.url + "/v1/chat/completions", content=b"{not json",
                     headers={"content-type": "application/json"})
    assert raw.status_code == 400 and raw.json()["error"]["type"] == "invalid_request_error"
    missing = httpx.post(server.url + "/v1/chat/completions", json={"model": "base"})
    assert missing.status_code == 400 and "messages" in missing.json()["error"]["message"]


def test_tools_functions_and_json_mode_are_refused_not_ignored(make_server, client_for):
    client = client_for(make_server())
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    for bad in (dict(tools=[tool]), dict(tool_choice="required"),
                dict(functions=[tool["function"]]), dict(function_call="auto"),
                dict(response_format={"type": "json_object"})):
        with pytest.raises(openai.BadRequestError) as exc:
            client.chat.completions.create(model="base", messages=USER, max_tokens=2, **bad)
        assert exc.value.status_code == 400
        assert "not supported" in exc.value.body["message"], bad
        assert exc.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="base", prompt="hi", max_tokens=2,
                                  extra_body={"tools": [tool]})
    fine = client.chat.completions.create(model="base", messages=USER, max_tokens=2,
                                          tool_choice="none", response_format={"type": "text"})
    assert fine.choices[0].finish_reason in ("stop", "length")


def test_api_key(make_server, client_for):
    server = make_server(api_key="sesame")
    with pytest.raises(openai.AuthenticationError):
        client_for(server, api_key="wrong").models.list()
    assert client_for(server, api_key="sesame").models.list().data


@pytest.mark.parametrize("half", ["launch", "collect"])
def test_an_engine_error_fails_that_request_and_the_server_goes_on(make_server, client_for,
                                                                   half):
    """A step that fails to launch, or to give its tokens (the scheduler calls the engine's
    launch and collect, not step)."""
    server = make_server()
    batch = server.state.scheduler.batch
    real, calls = getattr(batch, half), []

    def broken(*args):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("boom")
        return real(*args)

    setattr(batch, half, broken)
    client = client_for(server)
    with pytest.raises(openai.InternalServerError) as exc:
        client.completions.create(model="base", prompt="hi", temperature=0, max_tokens=8)
    assert "boom" in exc.value.body["message"]
    ok = client.completions.create(model="base", prompt="hi", temperature=0, max_tokens=8)
    assert ok.usage.completion_tokens >= 1
    assert len(batch.free_rows) == batch.max_rows


def test_timeout_is_a_504(make_server, client_for):
    client = client_for(make_server(timeout_s=0.001))
    with pytest.raises(openai.APIStatusError) as exc:
        client.completions.create(model="base", prompt="hi", max_tokens=200)
    assert exc.value.status_code == 504


@pytest.mark.parametrize(("prefill_chunk", "admit"), [(0, "add"), (512, "begin")])
def test_a_failing_prefill_or_scheduler_bug_is_a_500_and_serving_goes_on(
        make_server, client_for, prefill_chunk, admit):
    """Whole prefills (add) or chunked rows (begin): the admission that fails is a 500."""
    server = make_server(prefill_chunk=prefill_chunk)
    scheduler, client = server.state.scheduler, client_for(server)
    real_add, real_drop = getattr(scheduler.batch, admit), scheduler._drop_finished
    broken = {"add": 1, "drop": 0}

    def add(*args, **kwargs):
        if broken["add"]:
            broken["add"] -= 1
            raise RuntimeError("prefill broke")
        return real_add(*args, **kwargs)

    def drop(out):
        if broken["drop"]:
            broken["drop"] -= 1
            raise KeyError("bug")
        real_drop(out)

    setattr(scheduler.batch, admit, add)
    scheduler._drop_finished = drop
    with pytest.raises(openai.InternalServerError) as exc:
        client.completions.create(model="base", prompt="hi", max_tokens=4)
    assert "prefill broke" in exc.value.body["message"]
    assert len(scheduler.batch.free_rows) == scheduler.batch.max_rows
    broken["drop"] = 1
    with pytest.raises(openai.InternalServerError):
        client.completions.create(model="base", prompt="hi", max_tokens=4)
    assert client.completions.create(model="base", prompt="hi", max_tokens=4).usage

"""The OpenAI-compatible HTTP front, driven by the official `openai` package against a live server:
same engine and answers as gRPC, streaming, usage, errors in OpenAI's shape, rows freed on disconnect."""

from __future__ import annotations

import http.client
import json
import shutil
import time

import openai
import pytest
from harness import RunningServer


@pytest.fixture(scope="module")
def srv(tiny_model_dir, adapter_sources, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    for name in ("a0", "a1"):
        shutil.copytree(adapter_sources / name, root / name)
    s = RunningServer(tiny_model_dir, root, http_port=0)
    yield s
    s.close()


@pytest.fixture(scope="module")
def oai(srv):
    with openai.OpenAI(base_url=f"http://127.0.0.1:{srv.server.http_port}/v1", api_key="unused",
                       max_retries=0, timeout=60) as client:
        yield client


def base_name(srv) -> str:
    return srv.server.base.name


def raw(srv, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    conn = http.client.HTTPConnection("127.0.0.1", srv.server.http_port, timeout=60)
    conn.request(method, path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
    response = conn.getresponse()
    return response.status, response.read()


def test_models_lists_the_base_and_every_adapter(srv, oai):
    models = {m.id: m for m in oai.models.list()}
    assert set(models) == {base_name(srv), "a0", "a1"}
    assert oai.models.retrieve("a1").id == "a1"
    with pytest.raises(openai.NotFoundError):
        oai.models.retrieve("nope")


@pytest.mark.parametrize("adapter", [None, "a0"])
def test_chat_answers_as_grpc_does(srv, oai, adapter):
    messages = [{"role": "user", "content": "Say something."}]
    grpc_answer = srv.client.predict(messages=messages, adapter_id=adapter, max_new_tokens=8)
    reply = oai.chat.completions.create(model=adapter or base_name(srv), messages=messages, max_tokens=8,
                                        temperature=0)
    assert reply.object == "chat.completion" and reply.model == (adapter or base_name(srv))
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == grpc_answer.text
    assert reply.choices[0].finish_reason == grpc_answer.finish_reason
    assert reply.usage.prompt_tokens == grpc_answer.prompt_tokens
    assert reply.usage.completion_tokens == grpc_answer.generated_tokens
    assert reply.usage.total_tokens == grpc_answer.prompt_tokens + grpc_answer.generated_tokens


def test_completions_answer_as_grpc_does(srv, oai):
    grpc_answer = srv.client.predict("Once upon a time", adapter_id="a1", max_new_tokens=6)
    reply = oai.completions.create(model="a1", prompt="Once upon a time", max_tokens=6, temperature=0)
    assert reply.object == "text_completion"
    assert reply.choices[0].text == grpc_answer.text and reply.usage.completion_tokens == grpc_answer.generated_tokens
    # Two prompts, two choices each: indices prompt by prompt, the prompt counted once per prompt.
    many = oai.completions.create(model="a1", prompt=["Once upon a time", "Hello"], n=2, max_tokens=3,
                                  temperature=0)
    assert [c.index for c in many.choices] == [0, 1, 2, 3]
    assert many.choices[0].text == many.choices[1].text == srv.client.predict(
        "Once upon a time", adapter_id="a1", max_new_tokens=3).text
    hello = srv.client.predict("Hello", adapter_id="a1", max_new_tokens=3)
    assert many.usage.prompt_tokens == grpc_answer.prompt_tokens + hello.prompt_tokens


def test_stop_sequences_and_length(srv, oai):
    free = oai.completions.create(model="a0", prompt="The", max_tokens=8, temperature=0).choices[0]
    assert free.finish_reason == "length"
    stop = free.text[2:4]
    if not stop.strip():
        pytest.skip("the greedy text has no usable stop string")
    cut = oai.completions.create(model="a0", prompt="The", max_tokens=8, temperature=0, stop=[stop]).choices[0]
    assert cut.finish_reason == "stop" and stop not in cut.text and free.text.startswith(cut.text)


def test_chat_stream_equals_the_whole_answer(srv, oai):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    whole = oai.chat.completions.create(model="a1", messages=messages, max_tokens=10, temperature=0)
    chunks = list(oai.chat.completions.create(model="a1", messages=messages, max_tokens=10, temperature=0,
                                              stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_seeded_sampling_repeats_and_n_choices_differ(srv, oai):
    def ask(**kw):
        return oai.completions.create(model="a0", prompt="Tell me", max_tokens=12, temperature=1.0, seed=7, **kw)

    first, again = ask(), ask()
    assert first.choices[0].text == again.choices[0].text
    streamed = list(oai.completions.create(model="a0", prompt="Tell me", max_tokens=12, temperature=1.0, seed=7,
                                           n=3, stream=True))
    texts = ["".join(c.choices[0].text for c in streamed if c.choices and c.choices[0].index == i) for i in range(3)]
    assert texts[0] == first.choices[0].text
    assert len(set(texts)) > 1  # choices after the first advance the seed


def test_errors_come_in_openai_shape(srv, oai):
    with pytest.raises(openai.NotFoundError) as e:
        oai.chat.completions.create(model="missing", messages=[{"role": "user", "content": "x"}], max_tokens=2)
    assert "missing" in str(e.value)
    cases = [
        dict(model="a0", messages=[{"role": "user", "content": "x"}], temperature=-1),
        dict(model="a0", messages=[{"role": "user", "content": "x"}], max_tokens=10_000),
        dict(model="a0", messages=[{"role": "user", "content": "x"}], logprobs=True),
        dict(model="a0", messages=[], max_tokens=2),
        dict(model="../etc", messages=[{"role": "user", "content": "x"}]),
        dict(model="a0", messages=[{"role": "wizard", "content": "x"}], max_tokens=2),
        dict(model="a0", messages=[{"role": "user", "content": "x"}], n=100),
    ]
    for kwargs in cases:
        with pytest.raises(openai.BadRequestError) as e:
            oai.chat.completions.create(**kwargs)
        assert e.value.body["type"] == "invalid_request_error" and e.value.body["message"], kwargs
    status, body = raw(srv, "POST", "/v1/chat/completions", b"{not json")
    assert status == 400 and "JSON" in json.loads(body)["error"]["message"]
    status, body = raw(srv, "POST", "/v1/chat/completions", b"[1, 2]")
    assert status == 400 and json.loads(body)["error"]["type"] == "invalid_request_error"
    status, body = raw(srv, "GET", "/v1/nothing-here")
    assert status == 404 and "error" in json.loads(body)
    assert srv.metric("loraserve_requests_total", method="openai/v1/chat/completions", code="INVALID_ARGUMENT") >= 8
    assert srv.metric("loraserve_requests_total", method="openai/v1/chat/completions", code="NOT_FOUND") == 1
    # Nothing of that touched the serving path.
    assert oai.completions.create(model="a0", prompt="ok", max_tokens=2, temperature=0).choices[0].text is not None


def test_a_dropped_stream_frees_its_row(srv):
    body = json.dumps({"model": "a0", "prompt": "Count:", "max_tokens": 200, "temperature": 0, "stream": True})
    conn = http.client.HTTPConnection("127.0.0.1", srv.server.http_port, timeout=60)
    conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200 and response.readline().startswith(b"data: ")
    assert srv.engine.in_flight == 1
    conn.close()
    deadline = time.monotonic() + 20
    while srv.engine.in_flight and time.monotonic() < deadline:
        time.sleep(0.05)
    assert srv.engine.in_flight == 0
    assert srv.metric("loraserve_requests_finished_total", reason="cancelled") >= 1


def test_flags_turn_the_http_front_on_and_size_its_bodies(monkeypatch):
    import argparse

    from loraserve.server.cli import add_serve_arguments, config_from_args

    def config(*argv):
        p = argparse.ArgumentParser()
        add_serve_arguments(p)
        return config_from_args(p.parse_args(argv))

    assert config().http_port == -1  # off unless asked for
    on = config("--http-port", "8000", "--max-inference-request-bytes", "1024", "--max-upload-bytes", "4096")
    assert (on.http_port, on.max_inference_request_bytes, on.lora.max_upload_bytes) == (8000, 1024, 4096)
    monkeypatch.setenv("LORASERVE_HTTP_PORT", "8001")
    assert config().http_port == 8001

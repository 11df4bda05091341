"""A plain prompt to an adapter is rendered the way its training rendered prompts (issue: an adapter
trained on {"prompt", "completion"} through the chat template answered raw-text prompts worse).

The rendering is read from the adapter's loraserve_metadata.json ("rendering"), written by the trainer."""

from __future__ import annotations

import json
import shutil

import grpc
import pytest
from harness import RunningServer
from loraserve.core.prompt import CHAT, RAW, rendering_record
from transformers import AutoTokenizer

PROMPT = "Review: the soup was cold.\nSentiment:"


@pytest.fixture(scope="module")
def srv(tiny_model_dir, adapter_sources, tmp_path_factory):
    root = tmp_path_factory.mktemp("root")
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    for name, rendering in (("chat", rendering_record(True, tok)), ("plain", rendering_record(False, tok)),
                            ("bare", None), ("alien", {"template": "chatml-v9"})):
        shutil.copytree(adapter_sources / "a1", root / name)
        if rendering is not None:
            (root / name / "loraserve_metadata.json").write_text(json.dumps({"rendering": rendering}))
    s = RunningServer(tiny_model_dir, root, max_batch_size=8)
    yield s
    s.close()


def test_chat_trained_adapter_renders_a_plain_prompt_as_its_user_turn(srv, tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    chat_ids = tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                       return_dict=True)["input_ids"]
    got = srv.client.predict(PROMPT, adapter_id="chat", max_new_tokens=8)
    as_messages = srv.client.predict(messages=[{"role": "user", "content": PROMPT}], adapter_id="chat",
                                     max_new_tokens=8)
    assert got.prompt_tokens == len(chat_ids) == as_messages.prompt_tokens
    assert got.text == as_messages.text
    raw = srv.client.predict(PROMPT, adapter_id="chat", max_new_tokens=8, raw_prompt=True)
    assert raw.prompt_tokens == len(tok(PROMPT)["input_ids"]) < got.prompt_tokens
    # Streaming takes the same rendering.
    assert "".join(c.text for c in srv.client.stream(PROMPT, adapter_id="chat", max_new_tokens=8)) == got.text


def test_plain_trained_unrecorded_and_base_prompts_stay_raw(srv, tiny_model_dir):
    n = len(AutoTokenizer.from_pretrained(tiny_model_dir)(PROMPT)["input_ids"])
    for adapter in ("plain", "bare", ""):
        assert srv.client.predict(PROMPT, adapter_id=adapter, max_new_tokens=2).prompt_tokens == n, adapter
    assert srv.client.get_adapter("chat").state  # the adapter stays servable either way


def test_a_rendering_this_server_cannot_reproduce_fails_plain_prompts_only(srv):
    with pytest.raises(grpc.RpcError) as e:
        srv.client.predict(PROMPT, adapter_id="alien", max_new_tokens=2)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "alien" in e.value.details() and "raw_prompt" in e.value.details()
    assert srv.client.predict(PROMPT, adapter_id="alien", max_new_tokens=2, raw_prompt=True).generated_tokens == 2
    assert srv.client.predict(messages=[{"role": "user", "content": "Hi"}], adapter_id="alien",
                              max_new_tokens=2).generated_tokens == 2


def test_a_changed_metadata_file_is_read_again(srv, tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    meta = srv.registry.root / "plain" / "loraserve_metadata.json"
    before = srv.client.predict(PROMPT, adapter_id="plain", max_new_tokens=2).prompt_tokens
    try:
        meta.write_text(json.dumps({"rendering": rendering_record(True, tok), "padding": "x" * 10}))
        assert srv.client.predict(PROMPT, adapter_id="plain", max_new_tokens=2).prompt_tokens > before
    finally:
        meta.write_text(json.dumps({"rendering": rendering_record(False, tok)}))
    assert srv.client.predict(PROMPT, adapter_id="plain", max_new_tokens=2).prompt_tokens == before


@pytest.mark.parametrize("bad", [
    "not json", "[1, 2]", json.dumps({"rendering": "chat"}), json.dumps({"rendering": {"template": CHAT,
                                                                                       "system_prompt": "Be nice"}}),
    json.dumps({"rendering": {"template": RAW, "generation_prompt": True}}),
    json.dumps({"rendering": {"template": CHAT, "extra": 1}}), "[" * 100_000,
])
def test_unusable_metadata_is_failed_precondition_never_internal(srv, bad):
    meta = srv.registry.root / "bare" / "loraserve_metadata.json"
    meta.write_text(bad)
    try:
        with pytest.raises(grpc.RpcError) as e:
            srv.client.predict(PROMPT, adapter_id="bare", max_new_tokens=2)
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION, e.value.details()
        assert str(srv.registry.root) not in e.value.details()
        assert srv.client.list_adapters()  # other calls are unaffected
    finally:
        meta.unlink()

"""Fuzzed files the server reads: adapter_config.json (uploaded through LoadAdapter, and found in the adapter
root) and JSONL training data (inline examples, and dataset files under the data root). Never INTERNAL or
UNKNOWN, and the server stays healthy."""

from __future__ import annotations

import json
import shutil
from collections import Counter

import pytest
from fuzz_calls import assert_documented, assert_healthy, call
from hypothesis import given, settings
from hypothesis import strategies as st
from loraserve.v1 import adapter_pb2, inference_pb2, training_pb2
from proto_strategies import CHARS, EDGE_TEXT, message

EXAMPLES = 60
# Any JSON value, NaN and infinities included (Python's json reads them), big integers too.
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(CHARS, max_size=20),
                    st.sampled_from([2**64, -(2**63) - 1, 1e308, -0.0, "", "\x00", "q_proj", ".*", "(", "(a|a)*$"]))
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(CHARS, max_size=12),
                                                                                        inner, max_size=4),
                    max_leaves=12)
RAW = st.one_of(st.binary(max_size=300), st.sampled_from([b"", b"\xef\xbb\xbf{}", b"\xff\xfe", b"[" * 50_000,
                                                          b'{"r": 8' + b" " * 10, b"\x00" * 64, b"NaN"]))
CONFIG_KEYS = ["r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern", "lora_dropout", "use_rslora",
               "task_type", "peft_type", "bias", "use_dora", "modules_to_save", "layers_to_transform",
               "base_model_name_or_path", "fan_in_fan_out"]


def adapter_configs(valid: dict):
    """Raw bytes, any JSON, or the valid config with some fields set to any JSON value (or removed)."""
    edits = st.dictionaries(st.sampled_from(CONFIG_KEYS) | st.text(CHARS, max_size=8),
                            JSON | st.just(None) | st.just("<drop>"), max_size=4)

    def edited(changes: dict) -> bytes:
        config = {**valid, **changes}
        return json.dumps({k: v for k, v in config.items() if v != "<drop>"}).encode()

    return st.one_of(RAW, JSON.map(lambda v: json.dumps(v).encode()), edits.map(edited), edits.map(edited))


def jsonl_files():
    """Raw bytes, or lines joined by any line breaks: mostly well-formed examples with any text (so some files
    are accepted), mixed with example-shaped objects holding any JSON values, any JSON, and raw bytes."""
    text = st.one_of(st.sampled_from(EDGE_TEXT[:5] + EDGE_TEXT[7:]), st.text(CHARS, max_size=30))
    field = st.one_of(JSON, text)
    good = st.one_of(
        st.fixed_dictionaries({"prompt": text, "completion": text}),
        st.fixed_dictionaries({"messages": st.tuples(text, text).map(
            lambda t: [{"role": "user", "content": t[0]}, {"role": "assistant", "content": t[1]}])}),
    )
    message_obj = st.fixed_dictionaries({}, optional={"role": st.sampled_from(["user", "assistant", "system"]) | field,
                                                      "content": field})
    odd = st.one_of(
        st.fixed_dictionaries({}, optional={"prompt": field, "completion": field,
                                            "messages": st.lists(message_obj, max_size=4) | JSON}),
        JSON,
    )
    line = st.one_of(good, good, good, odd).map(lambda v: json.dumps(v).encode()) | RAW
    lines = st.lists(line, max_size=8)
    return st.one_of(RAW, st.tuples(lines, st.sampled_from([b"\n", b"\r\n", b"\n\n", b"\r"])).map(
        lambda t: t[1].join(t[0])))


@pytest.fixture(scope="module")
def a0_files(adapter_sources) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in (adapter_sources / "a0").iterdir() if p.name.startswith("adapter_")}


def test_fuzzed_adapter_configs_uploaded_and_on_disk(fuzz_server, a0_files):
    valid = json.loads(a0_files["adapter_config.json"])
    on_disk = fuzz_server.registry.root / "fz-disk"

    @settings(settings.get_profile("fuzz"), max_examples=EXAMPLES)
    @given(config=adapter_configs(valid))
    def run(config):
        files = {**a0_files, "adapter_config.json": config}
        upload = adapter_pb2.LoadAdapterRequest(adapter_id="fz-up", upload=adapter_pb2.AdapterUpload(files=files),
                                                overwrite=True)
        assert_documented(call(fuzz_server, "AdapterService", "LoadAdapter", upload, False)[0], config)
        # The same config already under the root, as a shared volume would hold it.
        shutil.rmtree(on_disk, ignore_errors=True)
        on_disk.mkdir()
        for name, data in files.items():
            (on_disk / name).write_bytes(data)
        for service, method, request, streaming in [
            ("AdapterService", "ListAdapters", adapter_pb2.ListAdaptersRequest(), False),
            ("AdapterService", "GetAdapter", adapter_pb2.GetAdapterRequest(adapter_id="fz-disk"), False),
            ("InferenceService", "Predict", inference_pb2.PredictRequest(
                prompt="Hello", adapter_id="fz-disk", sampling=inference_pb2.SamplingParams(max_new_tokens=2)), False),
            ("AdapterService", "LoadAdapter", adapter_pb2.LoadAdapterRequest(adapter_id="fz-disk"), False),
        ]:
            assert_documented(call(fuzz_server, service, method, request, streaming)[0], (method, config))
        assert_healthy(fuzz_server)

    run()
    assert fuzz_server.client.predict("Hello", adapter_id="a0", max_new_tokens=2).generated_tokens == 2


def train_and_stop(srv, request: training_pb2.TrainRequest, what) -> str:
    code, replies = call(srv, "TrainingService", "Train", request, True)
    assert_documented(code, what)
    if replies:  # accepted: stop the job so the next example finds room
        call(srv, "TrainingService", "CancelTrainingJob",
             training_pb2.CancelTrainingJobRequest(job_id=replies[0].event.job_id), False)
    return code.name


SMALL = training_pb2.TrainingSettings(max_steps=1, batch_size=2, eval_fraction=0.0, rank=4, max_length=64)


def test_fuzzed_dataset_files(fuzz_server):
    seen = Counter()

    @settings(settings.get_profile("fuzz"), max_examples=EXAMPLES)
    @given(content=jsonl_files(), truncate=st.booleans())
    def run(content, truncate):
        (fuzz_server.data_root / "fz.jsonl").write_bytes(content)
        request = training_pb2.TrainRequest(adapter_id="fz-data", dataset_path="fz.jsonl", settings=SMALL,
                                            overwrite=True, truncate=truncate)
        seen[train_and_stop(fuzz_server, request, content)] += 1
        assert_healthy(fuzz_server)

    run()
    assert seen["OK"] and seen["INVALID_ARGUMENT"], seen  # both accepted and refused files came up


def test_fuzzed_inline_examples(fuzz_server):
    seen = Counter()
    hints = {"role": st.sampled_from(["user", "assistant", "system", "tool"])}
    # Well-formed examples with any text beside field-by-field fuzzed ones, so accepted requests come up
    # whatever the (derandomized) draws are: fully fuzzed examples are almost never all valid at once.
    words = st.text(CHARS, min_size=1, max_size=30).filter(str.strip)
    good = st.builds(lambda p, c: training_pb2.TrainingExample(prompt=p, completion=c), st.text(CHARS, max_size=30),
                     words)
    examples = st.lists(st.one_of(good, good, message(training_pb2.TrainingExample, hints)), min_size=1, max_size=6)

    @settings(settings.get_profile("fuzz"), max_examples=EXAMPLES)
    @given(examples=examples, truncate=st.booleans())
    def run(examples, truncate):
        request = training_pb2.TrainRequest(adapter_id="fz-inline", examples=examples, settings=SMALL,
                                            overwrite=True, truncate=truncate)
        seen[train_and_stop(fuzz_server, request, examples)] += 1
        assert_healthy(fuzz_server)

    run()
    assert seen["OK"] and seen["INVALID_ARGUMENT"], seen
    assert fuzz_server.client.predict("Hello", max_new_tokens=2).generated_tokens == 2

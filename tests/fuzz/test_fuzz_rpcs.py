"""Every RPC's request message, built field by field by hypothesis, through a real channel: never INTERNAL
or UNKNOWN, always an answer, and the server stays healthy and serving.

Half the examples are arbitrary messages (mostly refused by the first check), half are a valid request
with some fields fuzzed, so the code behind validation is fuzzed too; the final test checks both kinds
got through.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict

import pytest
from fuzz_calls import assert_documented, assert_healthy, call
from hypothesis import given, settings
from hypothesis import strategies as st
from loraserve.v1 import adapter_pb2, inference_pb2, training_pb2
from proto_strategies import message, near

SERVICES = {"InferenceService": inference_pb2, "AdapterService": adapter_pb2, "TrainingService": training_pb2}
RPCS = [(service, m.name, m.server_streaming)
        for service, module in SERVICES.items()
        for m in module.DESCRIPTOR.services_by_name[service].methods]
SEEN: dict[str, Counter] = defaultdict(Counter)  # method -> status code names its examples got
EXAMPLES = 60


@pytest.fixture(scope="module")
def context(fuzz_server, adapter_sources):
    """A finished training job and a data set to name, valid requests per RPC, and field hints."""
    examples = [{"prompt": f"Q{i}", "completion": f"A{i}"} for i in range(8)]
    (fuzz_server.data_root / "train.jsonl").write_text("\n".join(json.dumps(x) for x in examples))
    settings_pb = training_pb2.TrainingSettings(max_steps=1, batch_size=2, eval_fraction=0.0, rank=4)
    train = training_pb2.TrainRequest(adapter_id="fz-train", settings=settings_pb, overwrite=True,
                                      examples=[training_pb2.TrainingExample(**x) for x in examples])
    events = list(fuzz_server.client.training.Train(train, timeout=120))
    job_id = events[0].event.job_id
    assert events[-1].event.HasField("completed"), events[-1]
    files = {p.name: p.read_bytes() for p in (adapter_sources / "a0").iterdir() if p.name.startswith("adapter_")}
    config = json.loads(files["adapter_config.json"])
    predict = dict(prompt="Hello", adapter_id="a1", sampling=inference_pb2.SamplingParams(max_new_tokens=4))
    valid = {
        "Predict": inference_pb2.PredictRequest(**predict),
        "PredictStream": inference_pb2.PredictStreamRequest(**predict),
        "Classify": inference_pb2.ClassifyRequest(adapter_id="t-cls", text="A fine day", top_k=2),
        "Tag": inference_pb2.TagRequest(adapter_id="t-tag", text="John lives in Paris."),
        "Answer": inference_pb2.AnswerRequest(adapter_id="t-qa", question="Who?", context="John did it in Paris.",
                                              top_k=2),
        "ListAdapters": adapter_pb2.ListAdaptersRequest(page_size=2),
        "GetAdapter": adapter_pb2.GetAdapterRequest(adapter_id="a0"),
        "LoadAdapter": adapter_pb2.LoadAdapterRequest(adapter_id="fz", upload=adapter_pb2.AdapterUpload(files=files),
                                                      overwrite=True),
        "UnloadAdapter": adapter_pb2.UnloadAdapterRequest(adapter_id="a0"),
        "DeleteAdapter": adapter_pb2.DeleteAdapterRequest(adapter_id="fz"),
        "Train": train,
        "GetTrainingJob": training_pb2.GetTrainingJobRequest(job_id=job_id),
        "ListTrainingJobs": training_pb2.ListTrainingJobsRequest(page_size=1),
        "CancelTrainingJob": training_pb2.CancelTrainingJobRequest(job_id=job_id),
        "WatchTrainingJob": training_pb2.WatchTrainingJobRequest(job_id=job_id),
    }
    hints = {  # plausible values for the fields the server looks things up by
        "adapter_id": st.sampled_from(["", "a0", "a1", "a2", "fz", "fz-train", "t-cls", "t-tag", "t-qa"]),
        "path": st.sampled_from(["a0", "a1/", "./a2", "", "fz", "x" * 300]),
        "page_token": st.sampled_from(["", "a0", "a1", job_id]),
        "job_id": st.sampled_from([job_id, job_id[:-1], "../.jobs"]),
        "role": st.sampled_from(["system", "user", "assistant", "tool"]),
        "dataset_path": st.sampled_from(["train.jsonl", "missing.jsonl", "../x.jsonl", "."]),
        "key": st.sampled_from(["adapter_config.json", "adapter_model.safetensors", "README.md"]),
        "value": st.sampled_from([files["adapter_model.safetensors"], files["adapter_config.json"],
                                  json.dumps({**config, "r": 64}).encode()]),
        "target_modules": st.sampled_from(["q_proj", "v_proj", "lm_head", ".*"]),
        "max_steps": st.integers(0, 3), "batch_size": st.integers(1, 4), "epochs": st.integers(1, 2),
        "rank": st.integers(1, 17), "max_length": st.integers(7, 600),
    }
    return valid, hints


@pytest.mark.parametrize("service,method,streaming", RPCS, ids=[f"{s}.{m}" for s, m, _ in RPCS])
def test_fuzzed_requests_get_documented_statuses(fuzz_server, context, service, method, streaming):
    valid, hints = context
    base = valid[method]

    @settings(settings.get_profile("fuzz"), max_examples=EXAMPLES)
    @given(request=st.one_of(message(type(base), hints), near(base, hints)))
    def run(request):
        code, replies = call(fuzz_server, service, method, request, streaming)
        assert_documented(code, request)
        SEEN[method][code.name] += 1
        if method == "Train" and replies:  # an accepted job: stop it, so the next examples find room
            call(fuzz_server, "TrainingService", "CancelTrainingJob",
                 training_pb2.CancelTrainingJobRequest(job_id=replies[0].event.job_id), streaming=False)
        assert_healthy(fuzz_server)

    run()


def test_still_serving_after_the_fuzzing(fuzz_server):
    print({m: dict(c) for m, c in SEEN.items()})
    assert_healthy(fuzz_server)
    assert fuzz_server.client.predict("Hello", max_new_tokens=3, timeout=30).generated_tokens == 3
    assert fuzz_server.engine.wait_idle(30)
    # The fuzz got past validation (OK) and was refused (INVALID_ARGUMENT) for every RPC.
    for method, codes in SEEN.items():
        assert codes["INVALID_ARGUMENT"] and codes["OK"] or method == "CancelTrainingJob", (method, codes)

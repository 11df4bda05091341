"""Extreme but valid sampling values stream beside other clients' requests and fail nobody, end to
end: a temperature of 1e-37 overflowed the sampling math, torch.multinomial raised,
and every row decoded in that step, other clients' requests included, ended INTERNAL mid-stream."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from harness import RunningServer, copy_adapters

PROMPTS = ["Hello there", "The quick brown fox jumps", "Numbers: one two", "Once upon a time"]
NORMAL = [(adapter, prompt) for adapter in ("", "a0", "a2") for prompt in PROMPTS[:3]]
NORMAL_TOKENS = 24
EXTREME_TOKENS = 16
# Each accepted by the API (temperature >= 0 and finite, top_p in (0, 1], top_k >= 0, seed < 2**64).
EXTREME = [
    dict(temperature=1e-37),
    dict(temperature=1e-45),  # the smallest float32 (subnormal)
    dict(temperature=3e38),  # near the largest float32
    dict(temperature=1e-37, top_p=1e-7),
    dict(temperature=1.0, top_p=1e-7),
    dict(temperature=1.0, top_k=1),
    dict(temperature=1e-37, top_k=1, top_p=1e-7, seed=2**64 - 1),
    dict(temperature=1.0, seed=2**64 - 1),
    dict(temperature=1e-37, seed=0, adapter_id="a1"),
]


def acts_greedy(sampling: dict) -> bool:
    """Whether the values leave one candidate: then the row must decode exactly as greedy does."""
    return sampling["temperature"] < 1e-30 or sampling.get("top_k") == 1 or sampling.get("top_p", 1.0) <= 1e-7


@pytest.fixture(scope="module", params=["static", "generic"])
def srv(request, tiny_model_dir, adapter_sources, tmp_path_factory):
    root = copy_adapters(adapter_sources, tmp_path_factory.mktemp("root"))
    s = RunningServer(tiny_model_dir, root, max_batch_size=32, static_engine=request.param == "static")
    yield s
    s.close()


def stream(srv, prompt, adapter_id="", max_new_tokens=NORMAL_TOKENS, **sampling):
    chunks = list(srv.client.stream(prompt, adapter_id=adapter_id, max_new_tokens=max_new_tokens, timeout=60,
                                    **sampling))
    final = chunks[-1]
    assert final.completion is not None and "".join(c.text for c in chunks) == final.completion.text
    return final.completion


def test_extreme_sampling_values_stream_beside_normal_requests(srv):
    alone = {}
    for adapter, prompt in NORMAL:
        got = stream(srv, prompt, adapter)
        assert (got.finish_reason, got.generated_tokens) == ("length", NORMAL_TOKENS)
        alone[adapter, prompt] = got.text
    greedy = {}  # the extreme requests' prompts and adapters, decoded greedily alone
    for i, sampling in enumerate(EXTREME):
        key = (sampling.get("adapter_id", ""), PROMPTS[i % len(PROMPTS)])
        greedy[key] = stream(srv, key[1], key[0], EXTREME_TOKENS).text

    # All at once, so the extreme rows are decoded in the same steps as the normal ones.
    start = threading.Barrier(len(NORMAL) + len(EXTREME))

    def normal(job):
        start.wait(timeout=30)
        return stream(srv, job[1], job[0])

    def extreme(i):
        start.wait(timeout=30)
        sampling = dict(EXTREME[i])
        return stream(srv, PROMPTS[i % len(PROMPTS)], sampling.pop("adapter_id", ""), EXTREME_TOKENS, **sampling)

    with ThreadPoolExecutor(len(NORMAL) + len(EXTREME)) as pool:
        normals = [pool.submit(normal, job) for job in NORMAL]
        extremes = [pool.submit(extreme, i) for i in range(len(EXTREME))]
        # A failed call raises grpc.RpcError here (INTERNAL, mid-stream, before the fix).
        together = {job: f.result(timeout=120) for job, f in zip(NORMAL, normals)}
        odd = [f.result(timeout=120) for f in extremes]

    for job, got in together.items():
        assert (got.finish_reason, got.generated_tokens) == ("length", NORMAL_TOKENS), job
        assert got.text == alone[job], job
    for i, (sampling, got) in enumerate(zip(EXTREME, odd)):
        assert (got.finish_reason, got.generated_tokens) == ("length", EXTREME_TOKENS), sampling
        if acts_greedy(sampling):  # a NaN in the math would pick some other token (or fail the step)
            assert got.text == greedy[sampling.get("adapter_id", ""), PROMPTS[i % len(PROMPTS)]], sampling
    assert srv.engine.wait_idle(10)

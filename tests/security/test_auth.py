"""API keys and scopes on a real server over TLS: each scope opens its RPCs and only those, missing and
wrong keys are UNAUTHENTICATED, health and reflection stay open, refusals are counted, the key file is
re-read when it changes, and the Python client carries TLS and its key end to end."""

from __future__ import annotations

import os

import grpc
import pytest
from dial import bearer, channel
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from harness import RunningServer
from loraserve.client import Client
from loraserve.server.api_keys import SCOPES, key_line, new_key, parse_scopes
from loraserve.server.config import SecurityConfig
from loraserve.server.service.auth import METHOD_SCOPES
from loraserve.v1 import adapter_pb2, inference_pb2, training_pb2

OK, NOT_FOUND, INVALID = grpc.StatusCode.OK, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT
UNKNOWN_JOB = "job-20250101-120000000-abcdef"
SAMPLING = inference_pb2.SamplingParams(max_new_tokens=1)
# One harmless request per method and what it answers once past auth: nothing here changes the server.
CALLS = {
    "/loraserve.v1.InferenceService/Predict": (inference_pb2.PredictRequest(prompt="Hi", sampling=SAMPLING), OK),
    "/loraserve.v1.InferenceService/PredictStream": (
        inference_pb2.PredictStreamRequest(prompt="Hi", sampling=SAMPLING), OK),
    "/loraserve.v1.InferenceService/Classify": (inference_pb2.ClassifyRequest(adapter_id="absent", text="Hi"),
                                                NOT_FOUND),
    "/loraserve.v1.InferenceService/Tag": (inference_pb2.TagRequest(adapter_id="absent", text="Hi"), NOT_FOUND),
    "/loraserve.v1.InferenceService/Answer": (
        inference_pb2.AnswerRequest(adapter_id="absent", question="Who?", context="Me."), NOT_FOUND),
    "/loraserve.v1.AdapterService/ListAdapters": (adapter_pb2.ListAdaptersRequest(), OK),
    "/loraserve.v1.AdapterService/GetAdapter": (adapter_pb2.GetAdapterRequest(adapter_id="absent"), NOT_FOUND),
    "/loraserve.v1.AdapterService/LoadAdapter": (adapter_pb2.LoadAdapterRequest(adapter_id="absent"), NOT_FOUND),
    "/loraserve.v1.AdapterService/UnloadAdapter": (adapter_pb2.UnloadAdapterRequest(adapter_id="absent"), NOT_FOUND),
    "/loraserve.v1.AdapterService/DeleteAdapter": (adapter_pb2.DeleteAdapterRequest(adapter_id="absent"), NOT_FOUND),
    "/loraserve.v1.TrainingService/Train": (training_pb2.TrainRequest(adapter_id="never"), INVALID),  # no examples
    "/loraserve.v1.TrainingService/GetTrainingJob": (training_pb2.GetTrainingJobRequest(job_id=UNKNOWN_JOB), NOT_FOUND),
    "/loraserve.v1.TrainingService/ListTrainingJobs": (training_pb2.ListTrainingJobsRequest(), OK),
    "/loraserve.v1.TrainingService/CancelTrainingJob": (
        training_pb2.CancelTrainingJobRequest(job_id=UNKNOWN_JOB), NOT_FOUND),
    "/loraserve.v1.TrainingService/WatchTrainingJob": (
        training_pb2.WatchTrainingJobRequest(job_id=UNKNOWN_JOB), NOT_FOUND),
}
STREAMING = {"/loraserve.v1.InferenceService/PredictStream", "/loraserve.v1.TrainingService/Train",
             "/loraserve.v1.TrainingService/WatchTrainingJob"}
KEYS = {scope: new_key() for scope in (*SCOPES, "*")}
ENV_KEY = new_key()


def call(ch: grpc.Channel, method: str, metadata=()) -> tuple[grpc.StatusCode, str]:
    request = CALLS[method][0]
    try:
        if method in STREAMING:
            for _ in ch.unary_stream(method, request_serializer=type(request).SerializeToString)(
                    request, metadata=metadata, timeout=30):
                pass
        else:
            ch.unary_unary(method, request_serializer=type(request).SerializeToString)(
                request, metadata=metadata, timeout=30)
    except grpc.RpcError as e:
        return e.code(), e.details()
    return OK, ""


def write_keys(path, extra: dict[str, str] | None = None) -> None:
    """KEYS (named by scope) plus `extra` name -> key with every scope; written then renamed."""
    lines = [key_line(key, scope.replace(":", "-").replace("*", "admin"), parse_scopes(scope))
             for scope, key in KEYS.items()]
    lines += [key_line(key, name, parse_scopes("*")) for name, key in (extra or {}).items()]
    fresh = path.with_name(path.name + ".new")
    fresh.write_text("# test keys\n\n" + "\n".join(lines) + "\n")
    os.replace(fresh, path)


@pytest.fixture(scope="module")
def keys_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("keys") / "api-keys"
    write_keys(path)
    return path


@pytest.fixture(scope="module")
def srv(tiny_model_dir, tmp_path_factory, pki, keys_file):
    s = RunningServer(tiny_model_dir, tmp_path_factory.mktemp("root"),
                      security=SecurityConfig(tls_cert=str(pki.server_cert), tls_key=str(pki.server_key),
                                              api_keys_file=str(keys_file), api_key=ENV_KEY),
                      connect={"root_ca": pki.ca, "api_key": KEYS["*"]})
    yield s
    s.close()


@pytest.fixture(scope="module")
def ch(srv, pki):
    with channel(srv.target, root_ca=pki.ca) as c:
        yield c


def test_every_method_is_exercised():
    assert set(CALLS) == set(METHOD_SCOPES)


@pytest.mark.parametrize("scope", SCOPES)
def test_a_scope_opens_its_methods_and_no_other(ch, scope):
    for method, needed in METHOD_SCOPES.items():
        code, details = call(ch, method, bearer(KEYS[scope]))
        if needed == scope:
            assert code == CALLS[method][1], (method, code, details)
        else:
            assert code == grpc.StatusCode.PERMISSION_DENIED, (method, code, details)
            assert f"lacks the scope '{needed}'" in details and KEYS[scope] not in details


@pytest.mark.parametrize("key", [KEYS["*"], ENV_KEY], ids=["all-scopes", "env"])
def test_an_all_scope_key_opens_every_method(ch, key):
    for method in METHOD_SCOPES:
        assert call(ch, method, bearer(key))[0] == CALLS[method][1], method


@pytest.mark.parametrize("metadata,message", [
    ((), "an API key is required"),
    (bearer("lsk_not-a-key-of-this-server"), "unknown API key"),
    ((("authorization", f"Basic {KEYS['*']}"),), "must be 'Bearer <key>'"),
    ((("x-api-key", KEYS["*"]),), "an API key is required"),
])
def test_missing_or_wrong_keys_are_unauthenticated(ch, metadata, message):
    for method in ("/loraserve.v1.InferenceService/Predict", "/loraserve.v1.TrainingService/WatchTrainingJob"):
        code, details = call(ch, method, metadata)
        assert code == grpc.StatusCode.UNAUTHENTICATED and message in details, (method, code, details)


def test_health_and_reflection_need_no_key(ch):
    status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10).status
    assert status == health_pb2.HealthCheckResponse.SERVING
    responses = reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)
    services = {s.name for r in responses for s in r.list_services_response.service}
    assert "loraserve.v1.TrainingService" in services


def test_refused_calls_are_counted_with_their_code(srv, ch):
    def count(method: str, code: str) -> float:
        return srv.metric("loraserve_requests_total", method=method, code=code)

    before = count("Train", "PERMISSION_DENIED"), count("PredictStream", "UNAUTHENTICATED")
    call(ch, "/loraserve.v1.TrainingService/Train", bearer(KEYS["inference"]))
    call(ch, "/loraserve.v1.InferenceService/PredictStream")
    assert (count("Train", "PERMISSION_DENIED"), count("PredictStream", "UNAUTHENTICATED")) == (
        before[0] + 1, before[1] + 1)


def test_the_key_file_is_reread_when_it_changes(ch, keys_file):
    late = new_key()
    method = "/loraserve.v1.AdapterService/ListAdapters"
    assert call(ch, method, bearer(late))[0] == grpc.StatusCode.UNAUTHENTICATED
    try:
        write_keys(keys_file, {"late": late})
        assert call(ch, method, bearer(late)) == (OK, "")
    finally:
        write_keys(keys_file)  # and revoked again
    assert call(ch, method, bearer(late))[0] == grpc.StatusCode.UNAUTHENTICATED


def test_python_client_over_tls_with_a_key(srv, pki):
    c = srv.client  # root_ca and the all-scope key
    assert c.predict("Hello", max_new_tokens=3).generated_tokens == 3
    chunks = list(c.stream("Hello", max_new_tokens=3))
    assert chunks[-1].completion is not None and chunks[-1].completion.generated_tokens == 3
    assert c.list_adapters() == []
    assert c.list_training_jobs() == []
    with Client(srv.target, root_ca=pki.ca, api_key=KEYS["adapters:read"]) as reader:
        assert reader.list_adapters() == []
        with pytest.raises(grpc.RpcError) as e:
            list(reader.stream("Hello", max_new_tokens=1))
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED and "'inference'" in e.value.details()

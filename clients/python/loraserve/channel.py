"""Channels to a loraserve server: plaintext or TLS (mutual TLS with a client certificate), with the
API key sent as `authorization: Bearer <key>` on every call, streaming ones included.

Also the command-line flags of the commands that talk to a server (`loraserve health`, `finetune`):
--tls, --tls-ca, --tls-cert, --tls-key, --tls-server-name, --api-key. Their defaults come from
LORASERVE_CLIENT_TLS_CA, LORASERVE_CLIENT_TLS_CERT, LORASERVE_CLIENT_TLS_KEY,
LORASERVE_CLIENT_TLS_SERVER_NAME and LORASERVE_API_KEY: CLIENT_ keeps them apart from the server's
own --tls-cert / --tls-key (LORASERVE_TLS_*) in the same container, where the health probe runs.
"""

from __future__ import annotations

import argparse
import json
import os
from collections import namedtuple
from pathlib import Path
from typing import Sequence

import grpc

Pem = str | Path | bytes
"""PEM contents (bytes) or the path of a PEM file."""


def open_channel(target: str, *, tls: bool = False, root_ca: Pem | None = None, client_cert: Pem | None = None,
                 client_key: Pem | None = None, server_name: str | None = None, api_key: str | None = None,
                 options: Sequence[tuple[str, object]] = ()) -> grpc.Channel:
    """A channel to `target`. TLS when `tls` or any certificate is given: `root_ca` verifies the server
    (default: the system's roots), `client_cert` and `client_key` answer a server that requires mutual
    TLS; `server_name` is the name to check the server's certificate against when it is not the host
    in `target` (e.g. a probe dialing 127.0.0.1)."""
    if (client_cert is None) != (client_key is None):
        raise ValueError("client_cert and client_key go together: give both or neither")
    options = list(options)
    if server_name:
        options.append(("grpc.ssl_target_name_override", server_name))
    if tls or root_ca is not None or client_cert is not None:
        credentials = grpc.ssl_channel_credentials(_pem(root_ca), _pem(client_key), _pem(client_cert))
        channel = grpc.secure_channel(target, credentials, options=options)
    elif server_name:
        raise ValueError("server_name only applies to TLS")
    else:
        channel = grpc.insecure_channel(target, options=options)
    if api_key is not None:
        channel = grpc.intercept_channel(channel, BearerKey(api_key))
    return channel


# Calls that are safe to send again when the server refused them with UNAVAILABLE (a replica draining,
# a connection lost before the call started): reads, and generation, which changes nothing on the
# server. Not Load/Unload/DeleteAdapter, Train or CancelTrainingJob: a retry could repeat their effect.
RETRYABLE = {
    "loraserve.v1.InferenceService": ("Predict", "PredictStream", "Classify", "Tag", "Answer"),
    "loraserve.v1.AdapterService": ("ListAdapters", "GetAdapter"),
    "loraserve.v1.TrainingService": ("GetTrainingJob", "ListTrainingJobs", "WatchTrainingJob"),
}


def retry_options(attempts: int) -> list[tuple[str, str]]:
    """gRPC's own retry policy for RETRYABLE, with exponential backoff. gRPC retries a stream only
    before its first response message, so no part of a stream is ever delivered twice."""
    if attempts <= 1:
        return [("grpc.enable_retries", 0)]
    policy = {"maxAttempts": min(attempts, 5), "initialBackoff": "0.2s", "maxBackoff": "5s",
              "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"]}
    names = [{"service": service, "method": method} for service, methods in RETRYABLE.items() for method in methods]
    config = {"methodConfig": [{"name": names, "retryPolicy": policy}]}
    return [("grpc.enable_retries", 1), ("grpc.service_config", json.dumps(config))]


def _pem(value: Pem | None) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    return Path(value).read_bytes()


class _CallDetails(namedtuple("_CallDetails", ("method", "timeout", "metadata", "credentials", "wait_for_ready",
                                               "compression")), grpc.ClientCallDetails):
    pass


class BearerKey(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds `authorization: Bearer <key>` to every call's metadata."""

    def __init__(self, api_key: str):
        key = api_key.strip()
        # gRPC metadata values are printable ASCII; a key pasted with a stray character fails here,
        # not as an opaque error on the first call.
        if not key or not key.isascii() or not key.isprintable() or " " in key:
            raise ValueError("the API key must be one word of printable ASCII")
        self._header = ("authorization", f"Bearer {key}")

    def _details(self, details: grpc.ClientCallDetails) -> _CallDetails:
        return _CallDetails(details.method, details.timeout, [*(details.metadata or ()), self._header],
                            details.credentials, details.wait_for_ready, details.compression)

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)

    def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)


def add_channel_arguments(parser: argparse.ArgumentParser) -> None:
    env = os.environ.get
    group = parser.add_argument_group("connection (TLS, API key)")
    group.add_argument("--tls", action="store_true", help="connect over TLS, verifying the server against the "
                        "system's roots (implied by --tls-ca / --tls-cert)")
    group.add_argument("--tls-ca", metavar="PEM", default=env("LORASERVE_CLIENT_TLS_CA"),
                        help="CA certificates that verify the server (implies --tls)")
    group.add_argument("--tls-cert", metavar="PEM", default=env("LORASERVE_CLIENT_TLS_CERT"),
                        help="client certificate, for a server that requires mutual TLS (with --tls-key)")
    group.add_argument("--tls-key", metavar="PEM", default=env("LORASERVE_CLIENT_TLS_KEY"),
                        help="private key of --tls-cert")
    group.add_argument("--tls-server-name", metavar="NAME", default=env("LORASERVE_CLIENT_TLS_SERVER_NAME"),
                        help="name the server's certificate must hold, when not the host dialed")
    group.add_argument("--api-key", metavar="KEY", default=env("LORASERVE_API_KEY"),
                        help="API key sent with every call (default: $LORASERVE_API_KEY; the flag shows in "
                             "the process list, the variable does not)")


def channel_settings(args: argparse.Namespace) -> dict:
    """open_channel's keyword arguments from the flags of add_channel_arguments."""
    # An empty variable (LORASERVE_API_KEY= in a compose file) means unset.
    return dict(tls=args.tls, root_ca=args.tls_ca or None, client_cert=args.tls_cert or None,
                client_key=args.tls_key or None, server_name=args.tls_server_name or None,
                api_key=args.api_key or None)

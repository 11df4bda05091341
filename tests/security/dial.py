"""Dialing a test server: fresh connections, keys as metadata."""

from __future__ import annotations

import grpc
from loraserve.channel import open_channel

FRESH = (("grpc.use_local_subchannel_pool", 1),)
"""A connection of its own per channel: gRPC otherwise shares one between channels with equal
settings, and a test about handshakes (mutual TLS, a reloaded certificate) must make its own."""


def channel(target: str, **settings) -> grpc.Channel:
    return open_channel(target, options=FRESH, **settings)


def bearer(key: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {key}"),)

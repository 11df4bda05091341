"""Whether a call the client went away from ended by its deadline or by a cancel.

The server cannot be told: both reach it as the same HTTP/2 stream reset. A client's deadline and the
server's copy of it (the grpc-timeout header, started when the request arrived) fire at almost the
same moment, and the client's reset often wins by a few milliseconds: judged by the server's clock
alone, those deadline hits looked like cancels (counted CANCELLED while the client saw
DEADLINE_EXCEEDED). A reset that arrives within DEADLINE_SLACK of the deadline is taken as the
deadline; a client that deliberately cancels that close to its own deadline is counted as a deadline
hit, which is what it would have been a moment later anyway.
"""

from __future__ import annotations

import grpc
from loraserve.server.engine.types import DEADLINE_SLACK  # loopback under load: resets up to ~6 ms early


def cancel_code(context) -> grpc.StatusCode:
    remaining = context.time_remaining()
    if remaining is not None and remaining <= DEADLINE_SLACK:
        return grpc.StatusCode.DEADLINE_EXCEEDED
    return grpc.StatusCode.CANCELLED

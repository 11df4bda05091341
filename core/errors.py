"""Errors the engine, registry and trainer raise; the service edge maps each to one gRPC status.

Anything else escaping to the edge is a bug and becomes INTERNAL.
"""


class LoraserveError(Exception):
    """Base class: the message is shown to the client as is."""


class NotFound(LoraserveError):
    pass


class InvalidArgument(LoraserveError):
    pass


class FailedPrecondition(LoraserveError):
    pass


class AlreadyExists(LoraserveError):
    pass


class ResourceExhausted(LoraserveError):
    pass


class Unavailable(LoraserveError):
    pass


class Cancelled(LoraserveError):
    pass


class DeadlineExceeded(LoraserveError):
    pass

"""The one error type users see: a clear message naming the file, field or value at fault."""


class CircuitdynError(Exception):
    """A user-facing error. The CLI prints its message (no stack trace) and exits with status 2."""

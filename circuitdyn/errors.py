"""The one error type users see: a clear message naming the file, field or value at fault."""


class CircuitdynError(Exception):
    """A user-facing error. The CLI prints its message (no stack trace) and exits with status 2."""


class CircuitdynWarning(UserWarning):
    """Kept for code that filters it; circuitdyn's user-facing notices are printed by `circuitdyn.messages.warn`
    (one stderr line, independent of Python's warning filters) and no longer raised as this warning."""

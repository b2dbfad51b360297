"""The one error type users see: a clear message naming the file, field or value at fault."""


class CircuitdynError(Exception):
    """A user-facing error. The CLI prints its message (no stack trace) and exits with status 2."""


class CircuitdynWarning(UserWarning):
    """Something accepted but likely unintended (e.g. an `epoch_x` folder beside a run's epochs); the CLI
    prints it as one line naming the file or value."""

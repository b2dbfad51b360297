"""User-facing notices: one line on stderr, `circuitdyn: warning: TEXT`.

Notices a user must see (an `epoch_x` folder ignored beside a run's epochs, ...) do not go through Python's
`warnings`: `PYTHONWARNINGS=ignore` or `-W ignore`, set for other libraries' noise, would silently remove them.
Each distinct text is printed once per scope: once per process for the library, once per command for the CLI
(`command()`), so a run opened several times is not warned of several times. `DeprecationWarning`s of the
library's own API stay Python warnings, for the developers who filter them.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_lock = threading.Lock()
_seen: set[str] = set()
_program = "circuitdyn"


def warn(text: str) -> bool:
    """Print `circuitdyn: warning: TEXT` to stderr unless this text was printed before in this scope;
    returns whether it was printed."""
    with _lock:
        if text in _seen:
            return False
        _seen.add(text)
        program = _program
    print(f"{program}: warning: {text}", file=sys.stderr, flush=True)
    return True


def reset() -> None:
    """Forget the notices printed so far (each is printed again on its next `warn`)."""
    with _lock:
        _seen.clear()


@contextmanager
def command(name: str) -> Iterator[None]:
    """Scope of one CLI command: notices read `circuitdyn NAME: warning: ...` (like its errors) and each is
    printed once within it; the previous scope is restored afterwards."""
    global _program, _seen
    with _lock:
        saved = _program, _seen
        _program, _seen = f"circuitdyn {name}", set()
    try:
        yield
    finally:
        with _lock:
            _program, _seen = saved

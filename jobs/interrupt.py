"""One Ctrl-C stops a command, even when it lands inside a finalizer.

Python runs a signal's handler in whatever Python code the main thread runs next. When that code
is an object's finalizer (a `__del__`: Ray's handles of actors and object refs, which a stage's
loop drops by the thousand, tqdm's bars), the KeyboardInterrupt raised there is printed as
"Exception ignored in ..." and the command goes on as if no key had been pressed
(tests/test_parts.py::test_a_ctrl_c_that_lands_in_a_finalizer_still_stops_the_parts). The
handler installed by `catching_ctrl_c` also records the signal, and the long loops of the stages
call `check()`, which raises it again there.
"""
from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType

_pending = False  # a SIGINT arrived that no caller has seen as a KeyboardInterrupt yet


def _on_sigint(signum: int, frame: FrameType | None) -> None:
    global _pending
    _pending = True
    raise KeyboardInterrupt


def check() -> None:
    """Raise KeyboardInterrupt if a Ctrl-C arrived under `catching_ctrl_c` and was swallowed
    (the handler's own exception, when it was not, has already left the loop that calls this)."""
    global _pending
    if _pending:
        _pending = False
        raise KeyboardInterrupt


@contextlib.contextmanager
def catching_ctrl_c() -> Iterator[None]:
    """SIGINT recorded for `check()` while the block runs (on the main thread only, where Python
    allows a handler); the previous handler is put back after it."""
    global _pending
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    _pending = False
    signal.signal(signal.SIGINT, _on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        _pending = False

"""What orbax does when a read or a save fails, tamed to the one-line errors of
:mod:`bptt_jax.cli.saving`: its error logs and the tracebacks of the coroutines it abandons
are silenced while a possibly broken step is read or a failing save runs, and a failed
save's writer threads are waited for before what they wrote is removed.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import sys
import threading
import time


class _Below(logging.Filter):
    def __init__(self, level: int):
        super().__init__()
        self.level = level

    def filter(self, record):
        return record.levelno < self.level


@contextlib.contextmanager
def quiet(level: int = logging.ERROR):
    """Silence orbax's own error logs (and those of the coroutines it abandons) while a
    possibly broken step is read or a failing save runs: the error this module raises says
    it in one line, where orbax would print tracebacks of tens to hundreds of lines."""
    loggers = [logging.getLogger(n) for n in ("absl", "asyncio", "concurrent.futures")]
    drop = _Below(level)
    for logger in loggers:
        logger.addFilter(drop)
    hook = sys.unraisablehook
    sys.unraisablehook = lambda _: None
    failed = False
    try:
        yield
    except BaseException:
        failed = True
        gc.collect()  # the failed read's coroutines are reported when collected: now
        raise
    finally:
        sys.unraisablehook = hook
        for logger in loggers:
            logger.removeFilter(drop)
        if failed:
            _drop_closed_loop_noise()


def _drop_closed_loop_noise() -> None:
    """From now on, drop the ``RuntimeError('Event loop is closed')`` that a read orbax
    abandoned reports when it completes later, into the event loop orbax has closed (a
    traceback on stderr, long after the error this module raised); every other unraisable
    exception goes to the hook as before. Installed once, after the first failed read."""
    previous = sys.unraisablehook
    if getattr(previous, "_bptt_jax_closed_loop", False):
        return

    def hook(unraisable):
        e = unraisable.exc_value
        if isinstance(e, RuntimeError) and str(e) == "Event loop is closed":
            return
        previous(unraisable)

    hook._bptt_jax_closed_loop = True
    sys.unraisablehook = hook


def first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    text = text[0] if text else ""
    text = text if len(text) <= 200 else text[:200] + "..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def is_read_error(e: Exception) -> bool:
    """Whether a failure to read a step means its files are bad (not memory, the device,
    permissions: those are raised as they are)."""
    return not isinstance(e, (MemoryError, RuntimeError, PermissionError))


def is_write_error(e: Exception) -> bool:
    """Whether a failed save failed to write (the file system's error, or tensorstore's
    report of a full disk), as opposed to a bad state or a bug: raised as it is."""
    if isinstance(e, OSError):
        return True
    text = str(e)
    return "No space left on device" in text or "Disk quota exceeded" in text


#: The longest wait for the writer threads of a failed save to end before removing what
#: they wrote.
WRITER_WAIT_S = 60.0


def join_writers() -> None:
    """Wait (up to :data:`WRITER_WAIT_S`) for orbax's writer threads (``_SignalingThread``,
    one per item being committed): after one item's write failed, the others still write
    into the step's temporary directory, which is removed only once they are done."""
    deadline = time.monotonic() + WRITER_WAIT_S
    for t in threading.enumerate():
        if type(t).__name__ == "_SignalingThread" and t is not threading.current_thread():
            t.join(max(0.0, deadline - time.monotonic()))

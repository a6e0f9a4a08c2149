"""What a rank's log says when the rank ended badly: its tail, and the Python stack that
faulthandler (enabled first thing in every rank) wrote there when a signal killed it."""

from __future__ import annotations

from pathlib import Path

LOG_TAIL_CHARS = 4000
# faulthandler opens its dump of a fatal signal with this line; the frames kept in a result
# are those of the thread the signal hit, innermost first.
FAULTHANDLER_HEADER = "Fatal Python error:"
PYTHON_STACK_MAX_FRAMES = 30


def read_log(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def python_stack(log_text: str) -> str | None:
    """The Python stack faulthandler wrote into a rank's log when a signal killed it, or None.

    Kept: the "Fatal Python error" line and the frames of the thread the signal hit (the
    native crash site's Python callers, e.g. ``full_tensor``); dropped: other threads and the
    list of extension modules, which can run to thousands of characters and would push the
    frames out of the log tail. The whole dump stays in the rank's log.
    """
    start = log_text.rfind(FAULTHANDLER_HEADER)
    if start < 0:
        return None
    lines = log_text[start:].splitlines()
    # all_threads=True marks the signalled thread "Current thread …"; a single-thread dump
    # says "Stack (most recent call first):". A signal in a thread that runs no Python (a
    # collective's native worker, as gloo's on CUDA tensors) marks none: then the waiting
    # main thread, listed last, is what says which call the rank was in.
    headers = [i for i, line in enumerate(lines) if line.startswith(("Current thread", "Stack (most recent"))]
    note = []
    if not headers:
        headers = [i for i, line in enumerate(lines) if line.startswith("Thread 0x")][-1:]
        note = ["(the signal hit a thread without Python frames; the main thread was in:)"]
    if not headers:
        return lines[0]
    thread = headers[0]
    frames = []
    for line in lines[thread + 1 :]:
        if not line.startswith("  "):
            break
        frames.append(line)
    hidden = len(frames) - PYTHON_STACK_MAX_FRAMES
    if hidden > 0:
        frames = frames[:PYTHON_STACK_MAX_FRAMES] + [f"  … {hidden} outer frames in the rank's log"]
    return "\n".join([lines[0], *note, lines[thread], *frames])

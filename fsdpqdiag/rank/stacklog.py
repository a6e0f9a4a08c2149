"""Keep the stack's own log lines out of the user's terminal and put them in the report.

bitsandbytes logs warnings at import time on some machines (on a CPU with AVX512-BF16,
``Failed to load CPU gemm_4bit_forward from kernels-community …`` when the optional
``kernels`` package is absent). With no handler configured, Python's last-resort handler
writes them to stderr, which breaks the contract that a mistake is one line on stderr and
mixes the stack's chatter into every command's output. Installed when ``fsdpqdiag`` is
imported (stdlib only, so ``--help`` stays fast); what it holds goes into the report's
``env`` section, because such a line says which kernel path the stack is on.
"""

from __future__ import annotations

import logging

# Loggers of the stack under test whose records are kept rather than printed.
CAPTURED_LOGGERS = ("bitsandbytes",)
_MAX_RECORDS = 50


class _Keeper(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if len(self.lines) >= _MAX_RECORDS:
            return
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed record must not break the run
            message = str(record.msg)
        line = f"{record.levelname} {record.name}: {message}"
        if line not in self.lines:
            self.lines.append(line)


_keeper = _Keeper()


def install() -> None:
    """Route the captured loggers to the keeper; idempotent."""
    for name in CAPTURED_LOGGERS:
        logger = logging.getLogger(name)
        if _keeper not in logger.handlers:
            logger.addHandler(_keeper)
        logger.propagate = False


def captured() -> list[str]:
    """The stack's log lines seen so far in this process (warnings and above)."""
    return list(_keeper.lines)

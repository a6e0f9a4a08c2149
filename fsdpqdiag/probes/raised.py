"""One record of a stage that raised, for every probe.

When the stack under test refuses a stage, the refusal is the finding: the exception's
first line, the innermost frame (where it was raised, often in ``torch/nn/parameter.py``),
the innermost FSDP2 frame on the way (the line of FSDP2 that made the failing call, which
the innermost frame does not name) and, where the probe names its modules, the innermost
module of the model the traceback passes through. Standard library only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from types import TracebackType
from typing import Any

# An exception's text can be a whole tensor repr; one line of this much is enough to match.
MAX_EXCEPTION_CHARS = 500


@dataclass(frozen=True)
class RaisedStage:
    stage: str | None
    exception: str
    frame: str | None
    fsdp_frame: str | None
    module: str | None = None
    module_type: str | None = None

    @classmethod
    def of(
        cls, exc: BaseException, stage: str | None = None, module_names: dict[int, str] | None = None
    ) -> RaisedStage:
        """The record of ``exc``; ``module_names`` (``id(module) -> name``) lets it name the
        innermost module of the model whose method the traceback passes through."""
        frames, module, module_type = [], None, None
        for tb in _walk(exc.__traceback__):
            code = tb.tb_frame.f_code
            frames.append(_frame_text(code.co_filename, tb.tb_lineno, code.co_name))
            owner = tb.tb_frame.f_locals.get("self") if module_names else None
            if owner is not None and id(owner) in module_names:
                module, module_type = module_names[id(owner)], type(owner).__name__
        fsdp_frames = [f for f in frames if "torch/distributed/fsdp/" in f]
        return cls(
            stage=stage,
            exception=_first_line(exc),
            frame=frames[-1] if frames else None,
            fsdp_frame=fsdp_frames[-1] if fsdp_frames else None,
            module=module,
            module_type=module_type,
        )

    def to_dict(self) -> dict[str, Any]:
        record = {
            "stage": self.stage,
            "exception": self.exception,
            "frame": self.frame,
            "fsdp_frame": self.fsdp_frame,
            "module": self.module,
            "module_type": self.module_type,
        }
        # The names the first probes wrote the same facts under: the Markdown renderer, the
        # standalone reproducers' comparisons and reports already on disk read them.
        record.update(status="raised", error=self.exception, where=self.frame)
        return record


def _walk(tb: TracebackType | None):
    while tb is not None:
        yield tb
        tb = tb.tb_next


def _first_line(exc: BaseException) -> str:
    message = str(exc).strip()
    first = message.splitlines()[0] if message else ""
    text = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    return text[:MAX_EXCEPTION_CHARS]


def _frame_text(filename: str, lineno: int | None, name: str) -> str:
    """``path:line in function``, the path from below site-packages where it lies there."""
    path = filename.replace(os.sep, "/").replace("\\", "/")
    for marker in ("site-packages/", "dist-packages/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{path}:{lineno} in {name}"

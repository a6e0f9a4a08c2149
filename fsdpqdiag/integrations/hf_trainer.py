"""The weight guard as a ``transformers.TrainerCallback``.

    from fsdpqdiag.integrations.hf_trainer import GuardCallback
    trainer = Trainer(..., callbacks=[GuardCallback(action="raise")])

The Trainer shards the model through accelerate (FSDP2: ``fully_shard``) while preparing it; the
callback attaches at the first ``on_train_begin``/``on_step_begin`` that sees a sharded model
(every rank runs the same callbacks, so the guard's one set-up collective lines up), and closes
the guard at ``on_train_end``. Steps are the optimizer's, as the Trainer's ``global_step``.

``GuardCallback(fix="fsdp2-bytes")`` applies that workaround process-wide when the callback is made
(before the Trainer shards the model: ``fsdpqdiag.fixes.apply``), names it in the guard's report
and removes it at ``on_train_end``; the guard then says whether forward received true bytes.
``GuardCallback(inject="nan-canonicalize")`` applies one of ``fsdpqdiag.stack.faults`` the same
way, the positive control the guard must trip on (``watch --inject`` inside the Trainer); the
report names it, so that its finding is not taken for one of the stack's.
Without a Trainer, call ``fsdpqdiag.guard(model)`` after ``fully_shard`` (see
``examples/train_fsdp2_qlora.py --guard``), or run the command under ``fsdpqdiag watch``.
"""

from __future__ import annotations

from pathlib import Path

from transformers import TrainerCallback


def _is_sharded(model) -> bool:
    return model is not None and any(hasattr(m, "_get_fsdp_state") for m in model.modules())


class GuardCallback(TrainerCallback):
    def __init__(
        self,
        *,
        params: str = "quantized",
        action: str = "raise",
        every: int = 1,
        report_path: str | Path | None = None,
        fix: str | None = None,
        inject: str | None = None,
    ):
        self.options = dict(params=params, action=action, every=every, report_path=report_path, fix=fix)
        self.guard = None
        self.state: dict | None = None
        self.fix_handle = None
        self.inject, self.undo_fault = inject, None
        if fix is not None:
            from fsdpqdiag import fixes

            self.fix_handle = fixes.apply(fix)  # ValueError for an unknown or inapplicable name
        if inject is not None:
            import os

            from fsdpqdiag.stack import faults

            rank, world_size = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
            self.undo_fault = faults.get(inject).apply(rank, world_size)  # ValueError: unknown fault

    def _attach(self, model) -> None:
        if self.guard is None and _is_sharded(model):
            from fsdpqdiag import guard

            self.guard = guard(model, **self.options)
            # Read when the guard's record and report are made, at close.
            self.guard.injected = self.inject

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._attach(model)

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self._attach(model)

    def on_train_end(self, args, state, control, **kwargs):
        if self.guard is not None:
            self.state = self.guard.close()
            self.guard = None
        if self.fix_handle is not None:
            self.fix_handle.undo()
            self.fix_handle = None
        if self.undo_fault is not None:
            self.undo_fault()
            self.undo_fault = None

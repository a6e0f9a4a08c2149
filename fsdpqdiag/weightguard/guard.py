"""Guard a real training run's weights: do the bytes forward receives still match the shards?

``guard(model)`` is called after ``fully_shard``. For every guarded parameter it digests the raw bits
of each rank's shard at set-up (on the device; one collective combines the ranks), and at every
unshard a forward pre-hook on the FSDP unit digests the tensors its modules' forwards receive
(``verify``: the hot path, its cost and why it needs no host sync). A digest that differs is
localized with the byte forensics of ``fsdpqdiag.evidence.bytes`` (this rank's slice of the
unsharded tensor against its own shard: differing elements, NaN classes, post bit patterns)
and a fingerprint, then acted on: raise, warn once per module, or record for a report.

The pieces: ``digest`` (why a digest of our own sees every flipped bit), ``params`` (which parameters,
where each shard lies, set-up digests), ``verify`` (the hooks' work), ``localize`` (forensics of an
altered weight), this module (hooks, action, per-process record), ``watch`` (the merged report).

Frozen parameters (quantized weights) are digested once; trainable ones (``params="all"``) again
after every optimizer step, from the shards (cast to FSDP2's ``param_dtype`` where mixed precision
casts them, as forward legitimately receives them). Nothing is gathered twice: the guard reads
what FSDP2 already unsharded. Computation never prints; ``action="warn"`` uses ``warnings``.
"""

from __future__ import annotations

import atexit
import json
import os
import sys
import time
import warnings
from pathlib import Path

from fsdpqdiag import envvars
from fsdpqdiag.rank import env
from fsdpqdiag.weightguard import verify
from fsdpqdiag.weightguard.localize import localize, unlocalized
from fsdpqdiag.weightguard.params import GuardedParam, collect, digest_shards

PARAM_CHOICES = ("quantized", "all")
ACTION_CHOICES = ("raise", "warn", "report")
STATE_SCHEMA = "fsdpqdiag.guard-state/1"


class GuardTripped(RuntimeError):
    """Raised (``action="raise"``) when a guarded weight reaches forward altered."""


def _check_options(params: str, action: str, every) -> None:
    if params not in PARAM_CHOICES:
        raise ValueError(f"params must be one of {', '.join(PARAM_CHOICES)}, got {params!r}")
    if action not in ACTION_CHOICES:
        raise ValueError(f"action must be one of {', '.join(ACTION_CHOICES)}, got {action!r}")
    if int(every) < 1:
        raise ValueError(f"every must be >= 1, got {every!r}")


class Guard:
    """The hooks and digests of one guarded model; ``close()`` removes every hook."""

    def __init__(
        self,
        model,
        *,
        params: str = "quantized",
        action: str = "raise",
        every: int = 1,
        report_path: str | Path | None = None,
        state_dir: str | Path | None = None,
        injected: str | None = None,
        fix: dict | None = None,
        argv: list[str] | None = None,
        legacy: bool = False,
    ):
        import torch.distributed as dist

        _check_options(params, action, every)
        self.params, self.action, self.every = params, action, int(every)
        self.report_path = Path(report_path) if report_path else None
        self.state_dir = Path(state_dir) if state_dir else None
        # The workaround applied to this process ({"name", "error"}): the report names it.
        self.injected, self.fix = injected, fix
        self.argv = list(argv or [])
        # The old per-weight path (a hook per module, a table of multipliers): to measure against.
        self.legacy = bool(legacy)
        self.roots = list(model) if isinstance(model, (list, tuple)) else [model]
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        # The job's stack, as its own process sees it (the interpreter and packages the command
        # runs on, which need not be watch's): rank 0's record carries it into the report.
        self.stack = env.capture(import_bitsandbytes=False) if self.rank == 0 else None
        self.backend = str(dist.get_backend()) if dist.is_initialized() else "none"
        self.step = 0
        self._optimizers: dict[int, bool] = {}
        self.forward_calls = 0
        self.findings: list[dict] = []
        self.handles: list = []
        self.closed = False
        self.started = time.time()
        # A process forked after set-up (a DataLoader worker) inherits this object: only the
        # process that set it up writes its record.
        self.pid = os.getpid()
        self.errors: list[str] = []
        self.setup_s = 0.0
        # Host time spent in the verification hooks and reading their results (on a GPU the
        # kernels run after it).
        self.hook_s = 0.0
        self.guarded, self.skipped = collect(self.roots, params)
        self._set_up()

    def _set_up(self) -> None:
        """Digest the shards, hook every guarded module's forward and the optimizer steps."""
        import torch
        from torch.distributed.tensor import DTensor
        from torch.optim.optimizer import register_optimizer_step_post_hook

        self.device = self.guarded[0].fsdp_param.sharded_param.device if self.guarded else torch.device("cpu")
        began = time.perf_counter()
        digest_shards(self.guarded, self.legacy)
        self.checks = verify.Checks(self.guarded, self.legacy)
        # Bytes the guard keeps allocated between steps (factors, a CPU scratch, device counters).
        self.resident_bytes = self.checks.resident_bytes
        self._dtensor = DTensor
        self._no_subclass_ops = torch._C.DisableTorchFunctionSubclass
        self.setup_s = time.perf_counter() - began
        for unit in self.checks.units:
            # After FSDP2's pre-forward hook (prepended at fully_shard): the unit is unsharded.
            hook = self._make_hook(unit)
            self.handles.append(unit.module.register_forward_pre_hook(hook))
            # Set up inside a unit's forward (``watch`` attaches at the first one, after FSDP2's
            # unshard), that forward's hooks have run already: its unsharded weights are checked now.
            if any(not isinstance(getattr(e.module, e.param_name), DTensor) for e in unit.entries):
                hook(unit.module, ())
        if self.params == "all" and any(entry.trainable for entry in self.guarded):
            self.handles.append(register_optimizer_step_post_hook(self._after_step))
        else:
            self.handles.append(register_optimizer_step_post_hook(self._count_step))
        atexit.register(self._at_exit)
        self.write_state()

    # -- optimizer steps: counted, and trainable shards digested again --------------------
    def _steps_this_model(self, optimizer) -> bool:
        """The optimizer hook is global: count only optimizers that update this model."""
        known = self._optimizers.get(id(optimizer))
        if known is None:
            mine = {id(p) for root in self.roots for p in root.parameters()}
            known = any(id(p) in mine for group in optimizer.param_groups for p in group["params"])
            self._optimizers[id(optimizer)] = known
        return known

    def _count_step(self, optimizer, args, kwargs) -> None:
        if not self._steps_this_model(optimizer):
            return
        self.step += 1
        began = time.perf_counter()
        self._drain(self.step - 1, block=False)
        self.hook_s += time.perf_counter() - began

    def _after_step(self, optimizer, args, kwargs) -> None:
        if not self._steps_this_model(optimizer):
            return
        self._count_step(optimizer, args, kwargs)
        if self.closed or self.step % self.every:
            return
        digest_shards([entry for entry in self.guarded if entry.trainable], self.legacy)
        self.checks.refresh()

    # -- verification at unshard ----------------------------------------------------------
    def _due(self) -> bool:
        return not self.closed and self.step % self.every == 0

    def _make_hook(self, unit: verify.UnitCheck):
        def verify(module, args) -> None:  # returns None: forward's inputs are left alone
            if not self._due():
                return
            began = time.perf_counter()
            try:
                self._verify(unit)
            except GuardTripped:
                raise
            except Exception as exc:  # noqa: BLE001 - the guard must not be what breaks a run
                # Recorded, and these weights are no longer verified: a guard that failed once
                # on a weight would fail on every forward.
                self.errors.append(f"{unit.entries[0].module_name}: {type(exc).__name__}: {exc}"[:500])
                unit.entries.clear()
                self.write_state()
            finally:
                self.hook_s += time.perf_counter() - began

        return verify

    def _verify(self, unit: verify.UnitCheck) -> None:
        """The hot path, every forward of every guarded unit: no import, string or (on a GPU)
        host sync; per weight a dict lookup and a few checks, per unit one kernel on a GPU."""
        self.forward_calls += 1
        # What forward receives, in the unit's order; None where nothing is to be digested now.
        tensors, altered = [], []
        dtensor = self._dtensor
        # Params4bit & co. route every attribute read through their ``__torch_function__``
        # (microseconds each): the storage's dtype, size and address are all this reads.
        with self._no_subclass_ops():
            for entry in unit.entries:
                tensor = entry.module._parameters.get(entry.param_name)
                if tensor is None:  # not registered as a parameter: what attribute lookup finds
                    tensor = getattr(entry.module, entry.param_name, None)
                if tensor is None or isinstance(tensor, dtensor):
                    tensors.append(None)  # not unsharded (a forward outside FSDP2's unshard)
                    continue
                tensor = entry.received(tensor)  # of a tensor subclass (NF4Tensor), an inner tensor
                entry.checks += 1
                same = tensor.dtype is entry.torch_dtype and tensor.numel() == entry.numel
                if entry.localize_pending or not same:
                    altered.append(entry)
                    tensors.append(None)
                else:
                    tensors.append(tensor)
            altered += self.checks.run(unit, tensors)
        for entry in altered:
            self._trip(entry, entry.unsharded(), self.step)

    def _drain(self, step: int, block: bool) -> None:
        """The GPU's mismatch counts of ``step``: a weight whose digest differed is localized at
        its next unshard (the bytes of the unshard that differed are gone by then)."""
        for entry, first_step in self.checks.collect(step, block):
            if entry.first_step is None:
                entry.first_step = first_step
                entry.localize_pending = True

    def _trip(self, entry: GuardedParam, tensor, step: int) -> None:
        finding = localize(entry, tensor, step, self.rank)
        entry.localize_pending = False
        entry.mismatches += 1
        entry.last_step = step
        first = entry.first_step is None or not any(f["parameter"] == entry.name for f in self.findings)
        if entry.first_step is None:
            entry.first_step = step
        if first:
            finding["first_step"] = entry.first_step
            self.findings.append(finding)
            self.write_state()
        message = (
            f"fsdpqdiag guard: {entry.name} reached forward altered at step {step} on rank {self.rank}: "
            f"{finding['summary']}"
        )
        if self.action == "raise":
            self.write_state()
            raise GuardTripped(message)
        if self.action == "warn" and not entry.warned:
            entry.warned = True
            warnings.warn(message, RuntimeWarning, stacklevel=2)

    # -- state, report, close -------------------------------------------------------------
    def state(self) -> dict:
        """This rank's record: what was guarded, how often checked, what was found."""
        return {
            "schema": STATE_SCHEMA,
            "rank": self.rank,
            "world_size": self.world_size,
            "device": self.device.type,
            "backend": self.backend,
            "pid": self.pid,
            "params": self.params,
            "action": self.action,
            "every": self.every,
            "injected": self.injected,
            "fix": self.fix,
            "argv": self.argv,
            "steps": self.step,
            "forward_calls": self.forward_calls,
            "setup_s": round(self.setup_s, 6),
            "hook_s": round(self.hook_s, 6),
            "closed": self.closed,
            "guarded": [
                {
                    "parameter": e.name,
                    "kind": e.kind,
                    "elements": e.numel,
                    "checks": e.checks,
                    "mismatches": e.mismatches,
                    "first_step": e.first_step,
                    "last_step": e.last_step,
                }
                for e in self.guarded
            ],
            "skipped": self.skipped,
            "errors": self.errors,
            **({"stack": self.stack} if self.stack is not None else {}),
            "findings": self.findings,
        }

    def write_state(self) -> None:
        if self.state_dir is None:
            return
        from fsdpqdiag.report.model import atomic_write_text

        if os.getpid() != self.pid:
            return
        path = self.state_dir / f"guard-{self.pid}-{id(self):x}.json"
        atomic_write_text(path, json.dumps(self.state(), default=str))

    def tripped(self) -> bool:
        return bool(self.findings) or any(e.first_step is not None for e in self.guarded)

    def _finish_checks(self) -> None:
        self._drain(self.step, block=True)
        # A mismatch found after the last unshard could not be localized: record it as it is.
        for entry in self.guarded:
            if entry.localize_pending:
                entry.localize_pending = False
                self.findings.append(unlocalized(entry, self.rank))

    def close(self) -> dict:
        """Remove every hook, finish pending comparisons, write the state (and, with
        ``report_path``, the merged report: a collective, so every rank must call it)."""
        if self.closed:
            return self.state()
        for handle in self.handles:
            handle.remove()
        self.handles = []
        atexit.unregister(self._at_exit)
        self._finish_checks()
        self.closed = True
        self.write_state()
        state = self.state()
        if self.report_path is not None:
            self._write_report(state)
        return state

    def _write_report(self, state: dict) -> None:
        import torch.distributed as dist

        from fsdpqdiag.report.model import atomic_write_text
        from fsdpqdiag.weightguard.watch import build_report

        states = [state]
        if dist.is_initialized() and self.world_size > 1:
            states = [None] * self.world_size
            dist.all_gather_object(states, state)
        if self.rank == 0:
            report = build_report(states, argv=self.argv or ["guard"], command_exit=None)
            atomic_write_text(self.report_path, report.to_json())

    def _at_exit(self) -> None:
        try:
            self._finish_checks()
            self.write_state()
        except Exception:  # noqa: BLE001 - never turn a finished run into a failed one
            pass


def guard(
    model,
    *,
    params: str = "quantized",
    action: str = "raise",
    every: int = 1,
    report_path: str | Path | None = None,
    fix: str | None = None,
) -> Guard:
    """Guard ``model`` (after ``fully_shard``; every rank must call it: set-up is a collective).

    ``params``: ``"quantized"`` (Params4bit, Int8Params, uint8/int8 parameters) or ``"all"``.
    ``action``: ``"raise"`` (GuardTripped), ``"warn"`` (once per module) or ``"report"`` (record;
    with ``report_path`` rank 0 writes a ``fsdpqdiag.report/1`` report at ``close()``).
    ``every``: verify the forwards of every N-th optimizer step (each check costs a pass over the
    unit's weights, see docs/guard.md). ``fix``: the name of a
    workaround applied to this run (``fsdpqdiag.fixes.apply``), named in the report.
    """
    return Guard(
        model, params=params, action=action, every=every, report_path=report_path,
        fix={"name": fix, "error": None} if fix else None,
        state_dir=os.environ.get(envvars.GUARD_DIR) or None,
        # What a report's "To reproduce" shows: the same script, guarded from outside.
        argv=["watch", "--", "python", *sys.argv],
    )  # fmt: skip

"""Guard a real training run's weights: do the bytes forward receives still match the shards?

``guard(model)`` is called after ``fully_shard``. For every guarded parameter it digests the raw
bits of each rank's shard at set-up (on the device; one collective combines the ranks), and at
every unshard a forward pre-hook digests the tensor the owning module's forward receives. A
digest that differs is localized with the byte forensics of ``fsdpqdiag.bytes`` (this rank's
slice of the unsharded tensor against its own shard: differing elements, NaN classes, post bit
patterns) and a fingerprint, then acted on: raise, warn once per module, or record for a report.

Why a digest of our own: PyTorch's DebugMode hashes tensors per op, but its default hash maps
NaN to 0 before an L1 norm, so it cannot see a NaN payload rewritten into another NaN — the
very change #1945 is about. This digest is exact on raw bits and position-aware:

    digest(x) = sum_i wrap32(bits(x_i) * m_i)  (mod 2**64)

with ``bits`` the element's integer view (8-byte elements as two 32-bit words), ``m_i`` a fixed
odd 31-bit multiplier per flat position (splitmix64 of i) and ``wrap32`` int32 arithmetic: a
multiply by an odd number is a bijection modulo 2**32, so any single changed element (or word)
changes the digest, and a swap of two elements does unless their multipliers are equal; several
changes go unseen only if their wrapped products cancel exactly (about 2**-32 for unrelated
changes). Being a sum over positions, the digest of the unsharded tensor is the sum of its
shards' digests, each taken at the shard's global offset, so no rank needs another rank's bytes.
int32 rather than int64 arithmetic halves the memory traffic (measured: 1.2 vs 2.1 ms for the
370k packed elements of tiny-llama on one CPU core).

Frozen parameters (quantized weights) are digested once; trainable ones (``params="all"``) again
after every optimizer step, from the shards (cast to FSDP2's ``param_dtype`` where mixed precision
casts them, since that cast is what forward legitimately receives). Nothing is gathered twice: the
guard reads what FSDP2 already unsharded. Computation never prints; ``action="warn"`` uses
``warnings``, the user's choice.
"""

from __future__ import annotations

import atexit
import json
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_MASK64 = (1 << 64) - 1
# Elements digested per kernel: bounds the int32 temporary to 4 MiB whatever the weight's size.
CHUNK = 1 << 20
PARAM_CHOICES = ("quantized", "all")
ACTION_CHOICES = ("raise", "warn", "report")
QUANTIZED_MODULES = ("Linear4bit", "LinearNF4", "LinearFP4", "Linear8bitLt")
QUANTIZED_PARAM_TYPES = ("Params4bit", "Int8Params")
STATE_SCHEMA = "fsdpqdiag.guard-state/1"

_TABLES: dict[str, Any] = {}


class GuardTripped(RuntimeError):
    """Raised (``action="raise"``) when a guarded weight reaches forward altered."""


def multipliers(count: int, device) -> Any:
    """The first ``count`` position multipliers (odd, 31-bit, int32) on ``device``; the table
    grows on demand and is shared by every parameter on that device."""
    import torch

    from fsdpqdiag.bytes import mix64

    key = str(device)
    table = _TABLES.get(key)
    if table is None or table.numel() < count:
        positions = torch.arange(max(count, 1), dtype=torch.int64, device=device)
        table = (((mix64(positions) >> 16) & 0x7FFFFFFF) | 1).to(torch.int32)
        _TABLES[key] = table
    return table


def _words(tensor):
    """Flat integer view of the bits; 8-byte elements as two int32 words each."""
    import torch

    from fsdpqdiag.bytes import element_bits

    bits = element_bits(tensor)
    if bits.element_size() == 8:
        return bits.view(torch.int32), 2
    return bits, 1


def digest_words(words, start: int, table=None):
    """Device int64 scalar: sum of ``wrap32(words[j] * m[start + j])``, no host sync."""
    import torch

    count = words.numel()
    table = multipliers(start + count, words.device) if table is None else table
    sums = []
    for begin in range(0, max(count, 1), CHUNK):
        end = min(begin + CHUNK, count)
        # int8/int16 * int32 promotes to int32 inside the one multiply kernel; never in place:
        # the words are the weight itself.
        product = words[begin:end] * table[start + begin : start + end]
        sums.append(product.sum(dtype=torch.int64))
    return sums[0] if len(sums) == 1 else torch.stack(sums).sum()


def digest(tensor, start_element: int = 0):
    """The position-aware digest of ``tensor``'s raw bits, as if it began at flat element
    ``start_element`` of a larger tensor (a shard at its global offset). Device int64 scalar."""
    words, per_element = _words(tensor)
    return digest_words(words, start_element * per_element)


def host(value) -> int:
    return int(value) & _MASK64


@dataclass
class Slice:
    rank: int
    start: int
    numel: int
    digest: int


@dataclass
class GuardedParam:
    name: str
    module_name: str
    module: Any
    param_name: str
    fsdp_param: Any
    kind: str
    trainable: bool
    cast_dtype: Any
    group: Any
    numel: int = 0
    shard_numel: int = 0
    slices_nonempty: list = field(default_factory=list)
    dtype: str = ""
    start: int = 0
    shard_digest: int = 0
    slices: list[Slice] = field(default_factory=list)
    expected: int = 0
    checks: int = 0
    mismatches: int = 0
    first_step: int | None = None
    last_step: int | None = None
    localize_pending: bool = False
    warned: bool = False

    def shard(self):
        local = self.fsdp_param.sharded_param._local_tensor
        return local if self.cast_dtype is None else local.to(self.cast_dtype)


def _is_quantized(module, param_name: str, local) -> str | None:
    import torch

    if type(local).__name__ in QUANTIZED_PARAM_TYPES:
        return type(local).__name__
    if param_name == "weight" and any(type(module).__name__ == n for n in QUANTIZED_MODULES):
        return type(module).__name__
    if local.dtype in (torch.uint8, torch.int8):
        return "int"
    return None


def _fsdp_params(modules) -> list:
    """Every FSDPParam of every FSDP unit under ``modules``, once each."""
    seen, found = set(), []
    for root in modules:
        for module in root.modules():
            get_state = getattr(module, "_get_fsdp_state", None)
            if get_state is None:
                continue
            state = get_state()
            groups = getattr(state, "_fsdp_param_groups", None)
            if groups is None:  # torch before per-param meshes: one group or None
                group = getattr(state, "_fsdp_param_group", None)
                groups = [group] if group is not None else []
            for group in groups:
                for fsdp_param in group.fsdp_params:
                    if id(fsdp_param) not in seen:
                        seen.add(id(fsdp_param))
                        found.append((fsdp_param, group))
    return found


def _cast_dtype(fsdp_param, group):
    """What FSDP2's mixed precision casts this parameter to before the all-gather (None: no cast),
    read from the parameter after lazy init, else by ``FSDPParam.init_dtype_attrs``' rule."""
    if hasattr(fsdp_param, "param_dtype"):
        return fsdp_param.param_dtype
    wanted = getattr(getattr(group, "mp_policy", None), "param_dtype", None)
    dtype = fsdp_param.sharded_param.dtype
    if wanted is None or wanted == dtype or not dtype.is_floating_point:
        return None
    return wanted


def _flat_start(sharded) -> int | None:
    """The flat element index where this rank's shard begins in the unsharded tensor; None where
    the shard is not one contiguous run of it (a shard on a dimension other than 0)."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if not all(isinstance(p, Replicate) or (type(p) is Shard and p.dim == 0) for p in sharded.placements):
        return None
    _, offset = compute_local_shape_and_global_offset(sharded.shape, sharded.device_mesh, sharded.placements)
    row = 1
    for size in sharded.shape[1:]:
        row *= size
    return int(offset[0]) * row if offset else 0


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
        argv: list[str] | None = None,
    ):
        import torch
        import torch.distributed as dist

        if params not in PARAM_CHOICES:
            raise ValueError(f"params must be one of {', '.join(PARAM_CHOICES)}, got {params!r}")
        if action not in ACTION_CHOICES:
            raise ValueError(f"action must be one of {', '.join(ACTION_CHOICES)}, got {action!r}")
        if int(every) < 1:
            raise ValueError(f"every must be >= 1, got {every!r}")
        self.params, self.action, self.every = params, action, int(every)
        self.report_path = Path(report_path) if report_path else None
        self.state_dir = Path(state_dir) if state_dir else None
        self.injected = injected
        self.argv = list(argv or [])
        self.roots = list(model) if isinstance(model, (list, tuple)) else [model]
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        self.backend = str(dist.get_backend()) if dist.is_initialized() else "none"
        self.step = 0
        self._optimizers: dict[int, bool] = {}
        self.forward_calls = 0
        self.findings: list[dict] = []
        self.skipped: list[dict] = []
        self.pending: list[tuple[GuardedParam, int, Any]] = []
        self.in_flight: list[tuple[list, Any, Any]] = []
        self.handles: list = []
        self.closed = False
        self.started = time.time()
        # A process forked after set-up (a DataLoader worker) inherits this object: only the
        # process that set it up writes its record.
        self.pid = os.getpid()
        self.errors: list[str] = []
        self.setup_s = 0.0
        # Host time spent inside the verification hooks (on a GPU the kernels run after it).
        self.hook_s = 0.0
        names = {}
        for root in self.roots:
            for name, module in root.named_modules():
                names.setdefault(id(module), name)
        self.guarded: list[GuardedParam] = []
        for fsdp_param, group in _fsdp_params(self.roots):
            info = fsdp_param._module_info
            module, param_name = info.module, info.param_name
            sharded = fsdp_param.sharded_param
            local = sharded._local_tensor
            module_name = names.get(id(module), type(module).__name__)
            qualified = f"{module_name}.{param_name}" if module_name else param_name
            quantized = _is_quantized(module, param_name, local)
            if params == "quantized" and quantized is None:
                continue
            start = _flat_start(sharded)
            if start is None:
                self.skipped.append({"parameter": qualified, "reason": f"placements {sharded.placements}"})
                continue
            trainable = bool(sharded.requires_grad)
            self.guarded.append(
                GuardedParam(
                    name=qualified,
                    module_name=module_name,
                    module=module,
                    param_name=param_name,
                    fsdp_param=fsdp_param,
                    kind=quantized or ("trainable" if trainable else "frozen"),
                    trainable=trainable,
                    # Quantized storage must reach forward as it is: a cast is itself the bug.
                    cast_dtype=None if quantized else _cast_dtype(fsdp_param, group),
                    group=getattr(getattr(fsdp_param, "mesh_info", None), "shard_process_group", None),
                    numel=sharded.numel(),
                    start=start,
                )
            )
        self.device = self.guarded[0].fsdp_param.sharded_param.device if self.guarded else torch.device("cpu")
        began = time.perf_counter()
        self._digest_shards(self.guarded)
        self.setup_s = time.perf_counter() - began
        by_module: dict[int, list[GuardedParam]] = {}
        for entry in self.guarded:
            by_module.setdefault(id(entry.module), []).append(entry)
        for entries in by_module.values():
            self.handles.append(entries[0].module.register_forward_pre_hook(self._make_hook(entries)))
        if params == "all" and any(entry.trainable for entry in self.guarded):
            from torch.optim.optimizer import register_optimizer_step_post_hook

            self.handles.append(register_optimizer_step_post_hook(self._after_step))
        else:
            from torch.optim.optimizer import register_optimizer_step_post_hook

            self.handles.append(register_optimizer_step_post_hook(self._count_step))
        atexit.register(self._at_exit)
        self.write_state()

    # -- digests of the shards ------------------------------------------------------------
    def _digest_shards(self, entries: list[GuardedParam]) -> None:
        """Digest each entry's shard at its global offset; one all-gather per process group
        (the FSDP shard group) gives every rank every slice's digest."""
        import torch
        import torch.distributed as dist

        if not entries:
            return
        groups: dict[int, list[GuardedParam]] = {}
        for entry in entries:
            groups.setdefault(id(entry.group), []).append(entry)
        for members in groups.values():
            digests = []
            for entry in members:
                shard = entry.shard()
                entry.dtype = str(shard.dtype).removeprefix("torch.")
                entry.shard_numel = shard.numel()
                digests.append(digest(shard, entry.start))
            # Where each shard lies never changes: it travels with the digests at set-up only.
            layout = torch.tensor(
                [v for entry in members for v in (entry.start, entry.shard_numel)],
                dtype=torch.int64,
                device=digests[0].device,
            )
            first = not members[0].slices
            mine = torch.cat([torch.stack(digests), layout]) if first else torch.stack(digests)
            group = members[0].group
            if dist.is_initialized():
                size = dist.get_world_size(group)
                backend = str(dist.get_backend(group))
                # gloo cannot carry CUDA tensors through all_gather (pytorch#152645): host them.
                carrier = mine if "nccl" in backend else mine.cpu()
                gathered = torch.empty(size * carrier.numel(), dtype=torch.int64, device=carrier.device)
                dist.all_gather_into_tensor(gathered, carrier, group=group)
                table = gathered.view(size, -1).tolist()
            else:
                table = [mine.tolist()]
            count = len(members)
            own = dist.get_rank(group) if dist.is_initialized() else 0
            for index, entry in enumerate(members):
                if first:
                    entry.slices = [
                        Slice(rank, row[count + 2 * index], row[count + 2 * index + 1], 0)
                        for rank, row in enumerate(table)
                    ]
                for piece in entry.slices:
                    piece.digest = host(table[piece.rank][index])
                entry.shard_digest = host(table[own][index])
                entry.slices_nonempty = [piece for piece in entry.slices if piece.numel > 0]
                entry.expected = sum(piece.digest for piece in entry.slices) & _MASK64

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
        self._drain(block=False)

    def _after_step(self, optimizer, args, kwargs) -> None:
        if not self._steps_this_model(optimizer):
            return
        self._count_step(optimizer, args, kwargs)
        if self.closed or self.step % self.every:
            return
        self._digest_shards([entry for entry in self.guarded if entry.trainable])

    # -- verification at unshard ----------------------------------------------------------
    def _due(self) -> bool:
        return not self.closed and self.step % self.every == 0

    def _make_hook(self, entries: list[GuardedParam]):
        def verify(module, args) -> None:  # returns None: forward's inputs are left alone
            if not self._due():
                return
            began = time.perf_counter()
            try:
                self._verify(module, entries)
            except GuardTripped:
                raise
            except Exception as exc:  # noqa: BLE001 - the guard must not be what breaks a run
                # Recorded, and these weights are no longer verified: a guard that failed once
                # on a weight would fail on every forward.
                self.errors.append(f"{entries[0].module_name}: {type(exc).__name__}: {exc}"[:500])
                entries.clear()
                self.write_state()
            finally:
                self.hook_s += time.perf_counter() - began

        return verify

    def _verify(self, module, entries: list[GuardedParam]) -> None:
        from torch.distributed.tensor import DTensor

        self.forward_calls += 1
        for entry in entries:
            tensor = getattr(module, entry.param_name)
            if isinstance(tensor, DTensor):
                continue  # not unsharded (a forward outside FSDP2's unshard): nothing received
            entry.checks += 1
            if entry.localize_pending or not self._same_form(entry, tensor):
                self._trip(entry, tensor, self.step)
                continue
            observed = digest(tensor, 0)
            if observed.device.type == "cpu":
                if host(observed) != entry.expected:
                    self._trip(entry, tensor, self.step)
            else:
                # No host sync per weight on a GPU: the digests are compared once per step.
                self.pending.append((entry, self.step, observed))

    def _same_form(self, entry: GuardedParam, tensor) -> bool:
        return str(tensor.dtype).removeprefix("torch.") == entry.dtype and tensor.numel() == entry.numel

    def _drain(self, block: bool) -> None:
        """Compare the digests taken on a GPU: launch this step's comparison and copy it to the
        host without waiting; read the comparisons whose copy has landed (all, when ``block``)."""
        import torch

        if self.pending:
            entries = [(entry, step) for entry, step, _ in self.pending]
            observed = torch.stack([value for _, _, value in self.pending])
            expected = torch.tensor(
                [_signed(entry.expected) for entry, _ in entries], dtype=torch.int64, device=observed.device
            )
            differs = observed != expected
            # Into pinned memory: a copy to pageable host memory would wait for the GPU.
            flags = torch.empty(differs.shape, dtype=torch.bool, pin_memory=True)
            flags.copy_(differs, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self.in_flight.append((entries, flags, event))
            self.pending = []
        still = []
        for entries, flags, event in self.in_flight:
            if block:
                event.synchronize()
            elif not event.query():
                still.append((entries, flags, event))
                continue
            for (entry, step), differs in zip(entries, flags.tolist()):
                if differs and entry.first_step is None:
                    # The bytes of that unshard are gone: localize at this module's next unshard.
                    entry.first_step = step
                    entry.localize_pending = True
        self.in_flight = still

    def _trip(self, entry: GuardedParam, tensor, step: int) -> None:
        finding = self._localize(entry, tensor, step)
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

    def _localize(self, entry: GuardedParam, tensor, step: int) -> dict:
        """Byte forensics of one altered weight on this rank: which slices differ (their
        digests), this rank's slice against its own shard element by element, a fingerprint."""
        from fsdpqdiag.bytes import diff, plain
        from fsdpqdiag.fingerprint import classify

        observed = plain(tensor)
        finding: dict[str, Any] = {
            "module": entry.module_name,
            "parameter": entry.name,
            "kind": entry.kind,
            "rank": self.rank,
            "step": step,
            "dtype": entry.dtype,
            "elements": entry.numel,
        }
        shard_now = host(digest(entry.shard(), entry.start))
        finding["shard_byte_true"] = shard_now == entry.shard_digest
        if not self._same_form(entry, observed):
            finding.update(
                comparable=False,
                reason=f"sharded {entry.dtype}[{entry.numel}] reached forward as "
                f"{str(observed.dtype).removeprefix('torch.')}{list(observed.shape)}",
            )
            finding["summary"] = finding["reason"]
            return finding
        words, per_element = _words(observed)
        differing = [
            s.rank
            for s in entry.slices_nonempty
            if host(
                digest_words(
                    words[s.start * per_element : (s.start + s.numel) * per_element], s.start * per_element
                )
            )
            != s.digest
        ]
        finding["slices_differing"] = differing
        mine = next((s for s in entry.slices_nonempty if s.rank == self._group_rank(entry)), None)
        comparison: dict[str, Any] = {"bytes_equal": True, "differing_elements": 0}
        if mine is not None and finding["shard_byte_true"]:
            flat = observed.reshape(-1)[mine.start : mine.start + mine.numel]
            comparison = diff(entry.shard().reshape(-1), flat)
            comparison["positions"] = [p + mine.start for p in comparison.get("positions", [])]
            for sample in comparison.get("samples", []):
                sample["index"] += mine.start
            finding["own_slice"] = {"start": mine.start, "elements": mine.numel}
        finding.update(
            {
                k: comparison.get(k)
                for k in (
                    "bytes_equal",
                    "differing_bytes",
                    "differing_elements",
                    "original_classes",
                    "post_bit_patterns",
                    "samples",
                    "positions_digest",
                )
                if k in comparison
            }
        )
        finding["fingerprint"] = (
            classify(comparison, observed.device) if comparison.get("differing_elements") else None
        )
        if not finding["shard_byte_true"]:
            what = "the shard itself changed since set-up (something wrote into it)"
        elif comparison.get("differing_elements"):
            patterns = ", ".join(list(comparison.get("post_bit_patterns") or {})[:3])
            what = (
                f"{comparison['differing_elements']} of {mine.numel if mine else 0} elements of this "
                f"rank's slice differ from its shard (post bits {patterns})"
            )
        elif not differing:
            what = "the digest differed, but every slice is byte-true now (a transient alteration)"
        else:
            what = (
                f"slices of rank(s) {', '.join(map(str, differing))} differ; this rank's slice is byte-true"
            )
        finding["summary"] = what
        return finding

    def _group_rank(self, entry: GuardedParam) -> int:
        import torch.distributed as dist

        return dist.get_rank(entry.group) if dist.is_initialized() else 0

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
            "findings": self.findings,
        }

    def write_state(self) -> None:
        if self.state_dir is None:
            return
        from fsdpqdiag.report import atomic_write_text

        if os.getpid() != self.pid:
            return
        path = self.state_dir / f"guard-{self.pid}-{id(self):x}.json"
        atomic_write_text(path, json.dumps(self.state(), default=str))

    def tripped(self) -> bool:
        return bool(self.findings) or any(e.first_step is not None for e in self.guarded)

    def _finish_checks(self) -> None:
        if self.in_flight or self.pending:
            self._drain(block=True)
        # A mismatch found after the last unshard could not be localized: record it as it is.
        for entry in self.guarded:
            if entry.localize_pending:
                entry.localize_pending = False
                self.findings.append(
                    {
                        "module": entry.module_name,
                        "parameter": entry.name,
                        "kind": entry.kind,
                        "rank": self.rank,
                        "step": entry.first_step,
                        "first_step": entry.first_step,
                        "summary": "the digest differed; no later unshard to localize it in",
                    }
                )

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

        from fsdpqdiag.report import atomic_write_text
        from fsdpqdiag.watch import build_report

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


def _signed(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def guard(
    model,
    *,
    params: str = "quantized",
    action: str = "raise",
    every: int = 1,
    report_path: str | Path | None = None,
) -> Guard:
    """Guard ``model`` (after ``fully_shard``; every rank must call it: set-up is a collective).

    ``params``: ``"quantized"`` (Params4bit, Int8Params, uint8/int8 parameters) or ``"all"``.
    ``action``: ``"raise"`` (GuardTripped), ``"warn"`` (once per module) or ``"report"`` (record;
    with ``report_path`` rank 0 writes a ``fsdpqdiag.report/1`` report at ``close()``).
    ``every``: verify the forwards of every N-th optimizer step.
    """
    import sys

    return Guard(
        model,
        params=params,
        action=action,
        every=every,
        report_path=report_path,
        state_dir=os.environ.get("FSDPQDIAG_GUARD_DIR") or None,
        # What a report's "To reproduce" shows: the same script, guarded from outside.
        argv=["watch", "--", "python", *sys.argv],
    )

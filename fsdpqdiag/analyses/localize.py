"""Which operation of FSDP2's unshard path alters the bytes of packed storage?

Two replays, both on a payload that holds every bf16 NaN bit pattern:

* ``ops``: each tensor operation that this torch's FSDP2 uses between a shard and the
  parameter forward sees, called directly on the current device — the registered
  ``torch.ops.fsdp`` ops themselves, not re-implementations — each tagged with the
  function of the installed ``torch/distributed/fsdp/_fully_shard/`` that calls it
  (found by reading that source at run time, so the answer is right for this version).
* ``pipeline``: a real ``fully_shard`` of a real ``Linear4bit`` carrying the payload, with
  its real unshard instrumented at each boundary (all-gather input after copy-in, the
  collective's output, copy-out, ``init_unsharded_param``, the parameter swap forward
  sees, bitsandbytes' QuantState recovery). The first stage whose bytes differ is named.

Whatever patches those functions (an injected fault, a fix) is part of what is measured.
"""

from __future__ import annotations

import ast
import contextlib
import inspect
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fsdpqdiag.core.config import LinearConfig
from fsdpqdiag.core.presentation import Presentation
from fsdpqdiag.probes.base import Needs, Probe, Verdict, failure_verdict
from fsdpqdiag.report.model import NOT_REPRODUCED, REPRODUCED

if TYPE_CHECKING:
    import torch

FSDP_MODULES = ("_fsdp_collectives", "_fsdp_param_group", "_fsdp_param", "_fsdp_common", "_fsdp_api")


def _source_lines(source: str) -> list[str]:
    """The lines of ``source`` with their endings, split where the parser splits them."""
    return re.findall(r"[^\r\n]*(?:\r\n|\r|\n)|[^\r\n]+$", source)


def _segment(lines: list[str], node: ast.AST) -> str:
    """``ast.get_source_segment(source, node)`` from lines split once: it splits the whole
    file again on every call, which made localize spend seconds per stage (1230 calls)."""
    first, last = node.lineno - 1, node.end_lineno - 1
    if first == last:
        return lines[first].encode()[node.col_offset : node.end_col_offset].decode()
    head = lines[first].encode()[node.col_offset :].decode()
    tail = lines[last].encode()[: node.end_col_offset].decode()
    return "".join([head, *lines[first + 1 : last], tail])


def call_sites(token: str, modules: tuple[str, ...] | None = None) -> list[dict[str, Any]]:
    """Functions of the installed sources whose body contains ``token``, with the line.

    ``modules`` defaults to FSDP2's own (torch/distributed/fsdp/_fully_shard/).
    """
    modules = modules or tuple(f"torch.distributed.fsdp._fully_shard.{m}" for m in FSDP_MODULES)
    sites = []
    for module_name in modules:
        try:
            module = __import__(module_name, fromlist=["_"])
        except ImportError:  # not every torch version has every FSDP2 module
            continue
        path = Path(inspect.getsourcefile(module))
        source = path.read_text()
        lines = _source_lines(source)
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                segment = _segment(lines, node)
                if token in segment:
                    offset = segment[: segment.index(token)].count("\n")
                    rel = path.as_posix().split("site-packages/")[-1]
                    sites.append({"file": rel, "function": node.name, "line": node.lineno + offset})
    return sites


def payload_linear(cfg: LinearConfig, device: torch.device):
    """A real quantized Linear4bit whose packed storage also holds every bf16 NaN pattern.

    The patterns are spread evenly over the rows so that every rank's shard carries some.
    """
    import torch

    from fsdpqdiag.evidence.bytes import all_nan_patterns, plain
    from fsdpqdiag.probes.common import build_linear4bit

    linear, x = build_linear4bit(cfg, device)
    storage = plain(linear.weight).view(-1)
    patterns = all_nan_patterns(torch.bfloat16, device)
    if storage.dtype == torch.bfloat16 and storage.numel() >= patterns.numel():
        stride = storage.numel() // patterns.numel()
        with torch.no_grad():
            storage[torch.arange(patterns.numel(), device=device) * stride] = patterns
    return linear, x


def _op_stage(name: str, token: str, run, modules: tuple[str, ...] | None = None) -> dict[str, Any]:
    import torch

    from fsdpqdiag.evidence.bytes import all_nan_patterns, diff

    payload = all_nan_patterns(torch.bfloat16, _op_stage.device)
    try:
        out = run(payload)
        result = diff(payload, out)
        status = "ran"
    except Exception as exc:  # noqa: BLE001 - an op this torch lacks is a finding, not a crash
        result, status = {"error": f"{type(exc).__name__}: {exc}"}, "error"
    return {"stage": name, "status": status, "call_sites": call_sites(token, modules), **result}


def replay_ops(device: torch.device, world_size: int) -> list[dict[str, Any]]:
    import torch
    import torch.distributed as dist
    import torch.distributed.fsdp._fully_shard._fsdp_collectives  # noqa: F401 registers ops
    from torch.distributed.fsdp._fully_shard._fsdp_common import _to_dtype_if_needed

    from fsdpqdiag.evidence.bytes import plain

    _op_stage.device = device

    def copy_in(x):
        schema = torch.ops.fsdp.all_gather_copy_in.default._schema
        names = [a.name for a in schema.arguments]
        if "all_gather_output" in names:
            output = torch.empty(x.numel() * world_size, dtype=x.dtype, device=x.device)
            inp, _ = torch.ops.fsdp.all_gather_copy_in([x], output, [x.numel()], x.numel(), 0)
        else:  # older schema: the op allocates the output itself
            inp, _ = torch.ops.fsdp.all_gather_copy_in(
                [x], [x.numel()], x.numel(), world_size, 0, x.dtype, x.device
            )
        return inp

    # Newer FSDP2 calls dist.all_gather_single, older dist.all_gather_into_tensor.
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather_token = "all_gather_single(" if hasattr(dist, "all_gather_single") else "all_gather_into_tensor("

    def collective(x):
        output = torch.empty(x.numel() * world_size, dtype=x.dtype, device=x.device)
        gather(output, x)
        return output[: x.numel()]

    def copy_out(x):
        gathered = x.repeat(world_size).view(world_size, -1)
        half = x.numel() // 2
        outs = [
            torch.empty(world_size, half, dtype=x.dtype, device=x.device),
            torch.empty(world_size, x.numel() - half, dtype=x.dtype, device=x.device),
        ]
        torch.ops.fsdp.split_with_sizes_copy(gathered, [half, x.numel() - half], dim=1, out=outs)
        return torch.cat([outs[0][0], outs[1][0]])

    def foreach_copy(x):
        out = torch.empty_like(x)
        torch._foreach_copy_([out], [x])
        return out

    def params4bit(x):
        import bitsandbytes as bnb

        wrapped = bnb.nn.Params4bit(x.view(-1, 1), quant_storage=torch.bfloat16, bnb_quantized=True)
        return plain(wrapped).view(-1)

    return [
        _op_stage("all-gather copy-in (torch.ops.fsdp.all_gather_copy_in)", "all_gather_copy_in(", copy_in),
        _op_stage(
            "mixed-precision cast (_to_dtype_if_needed)",
            "_to_dtype_if_needed(",
            lambda x: _to_dtype_if_needed(x, torch.bfloat16),
        ),
        _op_stage("foreach copy (torch._foreach_copy_)", "_foreach_copy_(", foreach_copy),
        _op_stage(f"all-gather collective (dist.{gather.__name__})", gather_token, collective),
        _op_stage(
            "world-size-1 copy (Tensor.copy_)", "tensor.copy_(", lambda x: torch.empty_like(x).copy_(x)
        ),
        _op_stage("copy-out (torch.ops.fsdp.split_with_sizes_copy)", "split_with_sizes_copy(", copy_out),
        _op_stage(
            "unsharded view (torch.as_strided)",
            "torch.as_strided(",
            lambda x: torch.as_strided(x, (x.numel(),), (1,)),
        ),
        _op_stage(
            "bitsandbytes recovery wrap (Params4bit(...))",
            "Params4bit(module.weight",
            params4bit,
            ("bitsandbytes.nn.modules",),
        ),
    ]


class _Recorder:
    """Copies of the unsharded weight's bytes at each boundary of FSDP2's real unshard."""

    def __init__(self) -> None:
        self.stages: dict[str, torch.Tensor] = {}

    def record(self, stage: str, tensor) -> None:
        import torch

        from fsdpqdiag.evidence.bytes import plain

        if stage not in self.stages and tensor is not None:
            if tensor.is_cuda:
                torch.cuda.synchronize(tensor.device)
            self.stages[stage] = plain(tensor).reshape(-1).clone()


@contextlib.contextmanager
def instrument(linear, recorder: _Recorder):
    """Wrap the real FSDP2 unshard functions of ``linear`` (already fully_shard-ed)."""
    from torch.distributed.fsdp._fully_shard._fsdp_param import FSDPParam

    state = linear._get_fsdp_state()
    group = state._fsdp_param_group
    original_comm = group._all_gather_comm
    original_init = FSDPParam.init_unsharded_param

    class RecordingAllGather:
        def __getattr__(self, name):
            return getattr(original_comm, name)

        def __call__(self, output_tensor, input_tensor, group, async_op=False, **kwargs):
            recorder.record("all-gather input after copy-in", input_tensor)
            work = original_comm(
                output_tensor=output_tensor,
                input_tensor=input_tensor,
                group=group,
                async_op=async_op,
                **kwargs,
            )
            if work is not None and hasattr(work, "wait"):
                work.wait()
            recorder.record("all-gather output (collective)", output_tensor)
            return work

    def init_unsharded_param(self):
        recorder.record("copy-out into the unsharded buffer", self.all_gather_outputs[0])
        original_init(self)
        recorder.record("init_unsharded_param (unsharded parameter)", self._unsharded_param)

    group._all_gather_comm = RecordingAllGather()
    FSDPParam.init_unsharded_param = init_unsharded_param
    pre = linear.register_forward_pre_hook(
        lambda m, a: recorder.record("parameter swap (weight forward receives)", m.weight)
    )
    post = linear.register_forward_hook(
        lambda m, a, o: recorder.record("bitsandbytes QuantState recovery (weight after forward)", m.weight)
    )
    try:
        yield
    finally:
        group._all_gather_comm = original_comm
        FSDPParam.init_unsharded_param = original_init
        pre.remove()
        post.remove()


PIPELINE_ORDER = (
    "all-gather input after copy-in",
    "all-gather output (collective)",
    "copy-out into the unsharded buffer",
    "init_unsharded_param (unsharded parameter)",
    "parameter swap (weight forward receives)",
    "bitsandbytes QuantState recovery (weight after forward)",
)


def replay_pipeline(cfg: LinearConfig, ctx) -> tuple[list[dict[str, Any]], torch.Tensor]:
    from fsdpqdiag.evidence.bytes import diff, plain
    from fsdpqdiag.probes.common import local_shard_of, shard

    linear, x = payload_linear(cfg, ctx.device)
    original = plain(linear.weight).clone()
    shard(linear, ctx, cfg)
    recorder = _Recorder()
    with instrument(linear, recorder):
        linear(x)
    flat = original.reshape(-1)
    local = local_shard_of(original, ctx.rank, ctx.world_size).reshape(-1)
    rows = []
    for stage in PIPELINE_ORDER:
        if stage not in recorder.stages:
            rows.append(
                {
                    "stage": stage,
                    "status": "not on this path",
                    "reason": f"FSDP2 at world size {ctx.world_size} does not pass through it",
                }
            )
            continue
        seen = recorder.stages[stage]
        reference = local if stage == "all-gather input after copy-in" else flat
        rows.append({"stage": stage, "status": "ran", **diff(reference, seen[: reference.numel()])})
    return rows, original


def run(config: dict[str, Any], ctx) -> dict[str, Any]:
    from fsdpqdiag.analyses.fingerprint import classify
    from fsdpqdiag.evidence.bytes import all_nan_patterns

    cfg = LinearConfig(**config)
    evidence: dict[str, Any] = {
        "payload": {"nan_patterns": int(all_nan_patterns().numel()), "dtype": "bfloat16"},
        "world_size_one_shortcut": bool(call_sites("world_size == 1")),
    }
    ctx.checkpoint("ops", evidence)
    evidence["ops"] = replay_ops(ctx.device, ctx.world_size)
    ctx.checkpoint("pipeline", evidence)
    evidence["pipeline"], _ = replay_pipeline(cfg, ctx)
    for section, key in (("ops", "first_altering_op"), ("pipeline", "first_altering_stage")):
        first = next(
            (row for row in evidence[section] if row.get("status") == "ran" and not row.get("bytes_equal")),
            None,
        )
        evidence[key] = None
        if first is not None:
            evidence[key] = {
                "stage": first["stage"],
                "call_sites": first.get("call_sites", []),
                "differing_elements": first.get("differing_elements"),
                "post_bit_patterns": first.get("post_bit_patterns"),
                "fingerprint": classify(first, ctx.device),
            }
    return evidence


def verdict(outcomes):
    failed = failure_verdict(outcomes, keep_evidence=True)
    if failed is not None:
        return failed
    evidence = dict(outcomes[0].evidence)
    op, stage = evidence["first_altering_op"], evidence["first_altering_stage"]
    if op is None and stage is None:
        return Verdict(
            NOT_REPRODUCED, "every op and every stage of the unshard path keeps every byte", evidence
        )
    parts = []
    if stage is not None:
        parts.append(
            f"first altering stage of the real unshard: {stage['stage']} "
            f"({stage['differing_elements']} elements -> {', '.join(stage['post_bit_patterns'])})"
        )
    else:
        parts.append("the real unshard at this world size keeps every byte")
    if op is not None:
        sites = ", ".join(f"{s['file']}:{s['function']}:{s['line']}" for s in op["call_sites"][:3])
        parts.append(
            f"first altering op: {op['stage']} ({op['differing_elements']} of "
            f"{evidence['payload']['nan_patterns']} NaN patterns -> "
            f"{', '.join(op['post_bit_patterns'])}), called by FSDP2 in {sites or 'no call site found'}"
        )
    return Verdict(REPRODUCED, "; ".join(parts), evidence)


def key_numbers(evidence: dict) -> str:
    """How a result reads: the first stage and the first op that alter bytes."""
    stage = (evidence.get("first_altering_stage") or {}).get("stage")
    op = (evidence.get("first_altering_op") or {}).get("stage")
    return f"first altering stage: {stage or 'none'}; first altering op: {op or 'none'}"


PROBE = Probe(
    name="localize",
    description=(
        "Replay FSDP2's unshard op by op on every bf16 NaN pattern; name the first op that alters bytes"
    ),
    run=run,
    verdict=verdict,
    needs=Needs(),
    presentation=Presentation(key_numbers, reads=frozenset({"first_altering_stage", "first_altering_op"})),
)

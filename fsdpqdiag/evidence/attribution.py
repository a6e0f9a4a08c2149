"""Which component a finding lives in, which control decided it, and known upstream issues.

A report goes to maintainers; naming the wrong component sends them after a ghost. Each
probe knows which of its controls separate the suspects (``Probe.attribute``: evidence ->
component and the controls that decided it); this module turns that into the report's
``attribution`` record and matches the finding against a small curated table of upstream
issues, each read at its source before it was added (2026-11-29). Stdlib only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from fsdpqdiag.core.verdict import VerdictKind

TORCH_FSDP = "torch.distributed.fsdp"
TORCH_DTENSOR = "torch.distributed.tensor"
BACKEND = "process-group backend"
BITSANDBYTES = "bitsandbytes"
TORCHAO = "torchao"
TRANSFORMERS = "transformers"
PEFT = "peft"
INJECTED = "injected fault"
UNDETERMINED = "undetermined"
COMPONENTS = (
    TORCH_FSDP, TORCH_DTENSOR, BACKEND, BITSANDBYTES, TORCHAO, TRANSFORMERS, PEFT, INJECTED, UNDETERMINED,
)  # fmt: skip

REPORT_TO = {
    TORCH_FSDP: "pytorch/pytorch",
    TORCH_DTENSOR: "pytorch/pytorch",
    # c10d's ProcessGroupGloo/NCCL bindings live in pytorch/pytorch.
    BACKEND: "pytorch/pytorch",
    BITSANDBYTES: "bitsandbytes-foundation/bitsandbytes",
    TORCHAO: "pytorch/ao",
    TRANSFORMERS: "huggingface/transformers",
    PEFT: "huggingface/peft",
}
# Verdicts that name a culprit and so carry an attribution.
ATTRIBUTED_VERDICTS = (
    VerdictKind.REPRODUCED,
    VerdictKind.CRASHED,
    VerdictKind.UNSUPPORTED,
    VerdictKind.INCONCLUSIVE,
)


@dataclass(frozen=True)
class KnownIssue:
    """An upstream issue and the signature that matches a finding to it.

    Every given field must match: ``fingerprint`` a conversion named in the evidence's
    fingerprint; ``text`` a substring of the summary or of an exception in the evidence;
    ``where`` a substring of a frame the evidence names; ``signal`` the signal a rank died by;
    ``backend``/``device`` the run's. ``fixed_in`` is the torch (or package) release where
    the issue is known fixed, if any.
    """

    ref: str
    title: str
    fingerprint: str | None = None
    text: str | None = None
    where: str | None = None
    signal: str | None = None
    backend: str | None = None
    device: str | None = None
    probes: tuple[str, ...] = ()
    # The verdicts the issue is the cause of: a crash issue explains a CRASHED or UNSUPPORTED
    # result, not a REPRODUCED one whose evidence merely mentions a later death.
    verdicts: tuple[str, ...] = ()
    fixed_in: str | None = None

    def label(self) -> str:
        return f"{self.ref} ({self.title}" + (f"; fixed in {self.fixed_in})" if self.fixed_in else ")")


KNOWN_ISSUES: tuple[KnownIssue, ...] = (
    KnownIssue(
        "pytorch/pytorch#159333",
        "torch._foreach_copy_() copies every bf16 NaN as one value on CUDA",
        fingerprint="torch._foreach_copy_",
    ),
    KnownIssue(
        "bitsandbytes-foundation/bitsandbytes#1945",
        "FSDP2 fully_shard breaks Linear4bit forward via NaN canonicalization (Mechanism A)",
        text="post bits 0x7fff",
        probes=("nan-canonicalization",),
    ),
    KnownIssue(
        "bitsandbytes-foundation/bitsandbytes#1945",
        "full_tensor()/redistribute() SIGSEGV on bf16-packed Params4bit (Mechanism B)",
        signal="SIGSEGV",
        text="full_tensor()",
        verdicts=(VerdictKind.CRASHED,),
    ),
    KnownIssue(
        "pytorch/pytorch#185239",
        "FSDP2 fully_shard crashes on non-floating-point parameters (_init_sharded_param)",
        text="only Tensors of floating point dtype can require gradients",
        where="_fsdp_param.py",
        fixed_in="torch 2.12",
    ),
    KnownIssue(
        "pytorch/pytorch#177844",
        "nn.Parameter creation in FSDPParam crashes for non floating point tensors",
        text="only Tensors of floating point dtype can require gradients",
        where="_fsdp_param.py",
        fixed_in="torch 2.12",
    ),
    KnownIssue(
        # An open pull request (read 2026-12-03): the world-size-1 fast path copies only the first
        # tensor fsdp_pre_all_gather returns, so an NF4Tensor's fsdp_post_all_gather gets one of three.
        "pytorch/pytorch#197999",
        "FSDP2's world-size-1 path hands fsdp_post_all_gather one all-gather output (all-gather extensions)",
        text="not enough values to unpack",
        where="_fsdp_param.py",
        probes=("torchao-nf4-reference",),
        verdicts=(VerdictKind.UNSUPPORTED,),
    ),
    KnownIssue(
        "pytorch/pytorch#152645",
        "ProcessGroupGloo allgather crashes with CUDA tensors",
        # A crashed probe names its signal; an UNSUPPORTED one the preflight's "died by SIGSEGV".
        text="SIGSEGV",
        backend="gloo",
        device="cuda",
        verdicts=(VerdictKind.CRASHED, VerdictKind.UNSUPPORTED),
    ),
)


def _texts(summary: str, evidence: dict) -> str:
    return summary + "\n" + json.dumps(evidence, default=str)


def known_issues(
    probe: str, verdict: str, summary: str, evidence: dict, backend: str, device: str, signal: str | None
):
    """Labels of the curated issues whose every given signature field matches."""
    text = _texts(summary, evidence)
    matches = ((evidence.get("fingerprint") or {}).get("matches")) or []
    found = []
    for issue in KNOWN_ISSUES:
        checks = (
            # A fingerprint names the conversion and the dtype it ran in: "torch._foreach_copy_ (bf16)".
            issue.fingerprint is None or any(m.startswith(issue.fingerprint) for m in matches),
            issue.text is None or issue.text in text,
            issue.where is None or issue.where in text,
            issue.signal is None or issue.signal == signal,
            issue.backend is None or issue.backend == backend,
            issue.device is None or issue.device == device,
            not issue.probes or probe in issue.probes,
            not issue.verdicts or verdict in issue.verdicts,
        )
        if all(checks):
            found.append(issue.label())
    return found


def record(
    component: str,
    decided_by: list[str],
    *,
    probe: str,
    verdict: str,
    summary: str,
    evidence: dict,
    backend: str,
    device: str,
    signal: str | None = None,
    injected: str | None = None,
) -> dict[str, Any]:
    """The report's attribution. An injected fault is always the component; the component
    the controls pointed to is kept beside it, so positive controls can check the logic."""
    if component not in COMPONENTS:
        raise ValueError(f"unknown component {component!r}")
    entry: dict[str, Any] = {
        "component": INJECTED if injected else component,
        "report_to": None if injected else REPORT_TO.get(component),
        "known_issues": []
        if injected
        else known_issues(probe, verdict, summary, evidence, backend, device, signal),
        "decided_by": list(decided_by) + ([f"--inject {injected}"] if injected else []),
    }
    if injected:
        entry["controls_point_to"] = component
    return entry


# What torchao-nf4-reference's verdict says of an altered bitsandbytes weight at the same world
# size: the same draw through torchao's NF4Tensor, which FSDP2 all-gathers as bytes.
_REFERENCE_SAYS = {
    "library": (
        "control: the same draw through torchao's NF4Tensor (all-gathered as bytes) under the same "
        "fully_shard kept every code (torchao-nf4-reference): the alteration follows bitsandbytes' "
        "packed storage in a float dtype, which FSDP2 unshards as floats"
    ),
    "stack": (
        "control: the same draw through torchao's NF4Tensor under the same fully_shard was altered "
        "too (torchao-nf4-reference): the alteration follows the stack, not the library"
    ),
}


def cite_reference(results: list) -> None:
    """Add to each altered ``nan-canonicalization`` result's attribution what the torchao
    reference at the same world size found, where it reached a verdict on whom the alteration
    follows (an UNSUPPORTED or absent reference adds nothing)."""
    follows = {
        r.world_size: r.evidence.get("follows")
        for r in results
        if r.probe == "torchao-nf4-reference" and r.verdict == VerdictKind.REPRODUCED
    }
    for result in results:
        attribution = result.evidence.get("attribution") if result.probe == "nan-canonicalization" else None
        said = _REFERENCE_SAYS.get(follows.get(result.world_size))
        if attribution and said and said not in attribution["decided_by"]:
            decided_by = attribution["decided_by"]
            injected = bool(decided_by) and decided_by[-1].startswith("--inject ")
            decided_by.insert(len(decided_by) - injected, said)  # the injected fault stays last

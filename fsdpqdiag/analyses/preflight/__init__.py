"""Stack preflight: can this device, backend and world size run the probes at all?

Before a probe blames FSDP2 or bitsandbytes, the stack under them must carry ordinary
tensors: the collectives FSDP2 and DTensor use (``all_gather_into_tensor``,
``reduce_scatter_tensor``, ``all_reduce``, ``DTensor.full_tensor()`` and
``redistribute``) are run on plain bf16 (every NaN payload included) and uint8/int8
tensors and checked byte for byte. Beside them: which kernel path bitsandbytes takes on the
chosen device and the CPU flags that select it, and, per FSDP unit of the model under test,
the dtype FSDP2 will all-gather in — by value in the parameters' dtype when every input
shares one, by bytes through uint8 when they differ, so which units expose packed storage
to a float copy depends on how the model is wrapped.

The checks run as a rank task through the launcher: a collective that kills its ranks
(gloo on CUDA segfaults in allgather, pytorch/pytorch#152645) is a failed capability and
a relaunch carries on with the next one. A probe whose precondition failed here is
UNSUPPORTED, never CRASHED or REPRODUCED: the stack, not the bug, decided it.

Parts: ``names`` (what they share), ``collectives`` and ``units`` (on each rank), ``task``
(the rank task), ``merge`` (in the parent). Import from here, ``fsdpqdiag.analyses.preflight``.
"""

from __future__ import annotations

from fsdpqdiag.analyses.preflight.collectives import (
    CHECKS,
    _bf16_payload,
    bitsandbytes_path,
    compare_bytes,
    cpu_isa_flags,
)
from fsdpqdiag.analyses.preflight.merge import (
    failed_capabilities,
    injected,
    instead,
    run_preflight,
    unsupported_verdict,
)
from fsdpqdiag.analyses.preflight.names import (
    ALL_GATHER,
    ALL_REDUCE,
    CAPABILITIES,
    COMPONENT,
    FLOAT_DTYPES,
    FSDP2_COLLECTIVES,
    FULL_TENSOR,
    ISA_FLAGS,
    KNOWN_ISSUES,
    NAME,
    OPTIONAL_KERNEL_PACKAGES,
    PAYLOAD_FINITE,
    REDISTRIBUTE,
    REDUCE_SCATTER,
    UNITS_STAGE,
)
from fsdpqdiag.analyses.preflight.task import (
    PROBE,
    run,
)
from fsdpqdiag.analyses.preflight.units import (
    fsdp_units,
)

__all__ = [
    "ALL_GATHER",
    "ALL_REDUCE",
    "CAPABILITIES",
    "CHECKS",
    "COMPONENT",
    "FLOAT_DTYPES",
    "FSDP2_COLLECTIVES",
    "FULL_TENSOR",
    "ISA_FLAGS",
    "KNOWN_ISSUES",
    "NAME",
    "OPTIONAL_KERNEL_PACKAGES",
    "PAYLOAD_FINITE",
    "PROBE",
    "REDISTRIBUTE",
    "REDUCE_SCATTER",
    "UNITS_STAGE",
    "_bf16_payload",
    "bitsandbytes_path",
    "compare_bytes",
    "cpu_isa_flags",
    "failed_capabilities",
    "fsdp_units",
    "injected",
    "instead",
    "run",
    "run_preflight",
    "unsupported_verdict",
]

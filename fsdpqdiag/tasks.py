"""Every rank task, registered: adding a probe is one module and one line here.

The composition of ``fsdpqdiag.core.registry``: this module imports every task module and
registers its ``PROBE``, which carries its presentation, and the presentation of the
guard's results, which ``watch`` writes. It is imported by the composition roots, ``api``
and the rank process's entry ``fsdpqdiag.rank.main``, and by the renderers, which find how
a result reads by its probe's name (:func:`presentation_of`). The modules it imports import
only below all of them (``probes.base``, ``presentation``, ``outcome``, ``config``, ...), so
it closes no import cycle (``tests/core/test_imports.py``). It lives outside ``fsdpqdiag.probes``
for that reason: the package's ``__init__`` runs whenever a task imports ``probes.base``.
"""

from __future__ import annotations

from fsdpqdiag.analyses import fix_verify, forensics, localize, preflight
from fsdpqdiag.analyses.matrix import task as matrix_cell
from fsdpqdiag.core import registry
from fsdpqdiag.core.presentation import Presentation
from fsdpqdiag.probes import (
    cpu_weight_repack,
    full_tensor_crash,
    nan_canonicalization,
    non_float_params,
    storage_dtype_mismatch,
    torchao_nf4_reference,
)
from fsdpqdiag.probes.int8_params import probe as int8_params
from fsdpqdiag.probes.moe_expert_quant import probe as moe_expert_quant
from fsdpqdiag.probes.quant_state_loss import probe as quant_state_loss
from fsdpqdiag.weightguard import watch

# The probes `reproduce` runs, in their default order.
registry.register(nan_canonicalization.PROBE, reproduce=True)
registry.register(torchao_nf4_reference.PROBE, reproduce=True)
registry.register(full_tensor_crash.PROBE, reproduce=True)
registry.register(non_float_params.PROBE, reproduce=True)
registry.register(quant_state_loss.PROBE, reproduce=True)
registry.register(storage_dtype_mismatch.PROBE, reproduce=True)
registry.register(int8_params.PROBE, reproduce=True)
registry.register(moe_expert_quant.PROBE, reproduce=True)
registry.register(cpu_weight_repack.PROBE, reproduce=True)

# The other commands' rank tasks.
registry.register(localize.PROBE)
registry.register(fix_verify.PROBE)
registry.register(matrix_cell.PROBE)
registry.register(forensics.PROBE)
registry.register(preflight.PROBE)

# Results no rank task writes: the guard's, merged by `watch` from the processes it guarded.
registry.present(watch.RESULT_KIND, watch.PRESENTATION)

PROBES = registry.reproduce_probes()
get_probe = registry.get_task


def presentation_of(probe: str) -> Presentation:
    """How a result that carries the probe name ``probe`` reads; a result of an older or
    foreign probe reads from its verdict alone (the default presentation)."""
    return registry.presentation(probe) or Presentation()

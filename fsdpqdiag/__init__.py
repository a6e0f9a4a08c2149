"""fsdpqdiag: diagnose byte-level bugs of FSDP2 sharding bitsandbytes quantized weights.

The Python API mirrors the CLI: ``fsdpqdiag.api.reproduce(...)`` returns the same
``Report`` that ``fsdpqdiag reproduce --json`` writes.
"""

__version__ = "0.1.0"


def guard(model, **options):
    """Guard a model's weights after ``fully_shard``: see ``fsdpqdiag.weightguard.guard.guard``.

    Defined here so that ``fsdpqdiag.guard(model)`` works while ``import fsdpqdiag`` stays
    torch-free.
    """
    from fsdpqdiag.weightguard.guard import guard as guard_model

    return guard_model(model, **options)

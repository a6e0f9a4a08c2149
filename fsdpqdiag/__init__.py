"""fsdpqdiag: diagnose byte-level bugs of FSDP2 sharding bitsandbytes quantized weights.

The Python API mirrors the CLI: ``fsdpqdiag.api.reproduce(...)`` returns the same
``Report`` that ``fsdpqdiag reproduce --json`` writes.
"""

__version__ = "0.1.0"

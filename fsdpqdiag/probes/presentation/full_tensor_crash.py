"""How a full-tensor-crash result reads: the same views of the weight as Mechanism A's."""

from __future__ import annotations

from fsdpqdiag.probes.presentation.nan_canonicalization import key_numbers

__all__ = ["key_numbers"]

"""How an int8-params result reads: each stage ok, altered, raised or not run."""

from __future__ import annotations

from fsdpqdiag.presentation import default_key_numbers as key_numbers

__all__ = ["key_numbers"]

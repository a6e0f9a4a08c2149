"""Byte forensics and attribution: what the bytes show and which component they implicate."""

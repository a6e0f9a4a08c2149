"""Views of a Report: rich tables, Markdown, JSON. Renderers never touch torch.

A renderer draws any report of its kind without naming a probe or a command: a probe's
key numbers and detail table come from its presentation (``fsdpqdiag.probes.presentation``),
and which view a report gets is chosen where commands are wired (``fsdpqdiag.cli``).
"""

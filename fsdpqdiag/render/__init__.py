"""Views of a Report: rich tables, Markdown, JSON. Renderers never touch torch.

A renderer draws any report of its kind without naming a probe or a command: a probe's
key numbers and detail table come from its presentation, which its own module declares and
``fsdpqdiag.tasks.presentation_of`` finds by the probe name a result carries; which view a
report gets is chosen where commands are wired (``fsdpqdiag.cli``).
"""

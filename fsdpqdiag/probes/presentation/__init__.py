"""Each probe's presentation, beside the probe: ``<probe name, dashes as underscores>.py``
holds its ``key_numbers(evidence) -> str`` and, where it has one, ``detail(evidence) ->
DetailTable``. These modules import nothing but ``fsdpqdiag.presentation``, which finds
them by name for the renderers and for ``Probe.presentation``;
``tests/test_probe_contract.py`` checks that every registered probe has one.
"""

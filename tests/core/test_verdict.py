"""Verdicts are an Enum whose members are the strings reports have always held."""

import json

from fsdpqdiag.core.verdict import STYLE, VerdictKind
from fsdpqdiag.report.model import VERDICTS, json_schema


def test_every_verdict_has_a_style():
    assert set(STYLE) == set(VerdictKind)
    assert all(STYLE[member] for member in VerdictKind)


def test_verdicts_serialize_and_compare_as_their_strings():
    assert VerdictKind.NOT_REPRODUCED == "NOT REPRODUCED"
    assert json.dumps({"verdict": VerdictKind.NOT_REPRODUCED}) == '{"verdict": "NOT REPRODUCED"}'
    assert f"{VerdictKind.NOT_VERIFIED:<14}|" == "NOT VERIFIED  |"
    assert str(VerdictKind.REPRODUCED) == "REPRODUCED"
    # A verdict read back from JSON finds its style.
    assert STYLE["CRASHED"] == STYLE[VerdictKind.CRASHED]


def test_the_schema_allows_exactly_the_verdicts():
    allowed = json_schema()["properties"]["results"]["items"]["properties"]["verdict"]["enum"]
    assert allowed == [member.value for member in VerdictKind]
    assert list(VERDICTS) == list(VerdictKind)

"""Hostile input bounded before it costs anything: untrusted JSON past a limit, two outputs
on stdout, work no memory can hold. In-process, on the real objects; nothing is launched."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from fsdpqdiag.api import memory
from fsdpqdiag.core import bounded_json
from fsdpqdiag.core.config import RunConfig
from fsdpqdiag.errors import BadInput

SMALL = bounded_json.Limits(max_bytes=4096, max_depth=8, max_elements=50, max_string_bytes=100)


@pytest.mark.parametrize(
    "text, problem",
    [
        (b"[" * 9 + b"]" * 9, "nested deeper than the limit of 8"),
        (b'{"a": [' + b"1," * 60 + b"1]}", "more than the limit of 50 elements"),
        (b"{" + b",".join(b'"k%d": 0' % i for i in range(60)) + b"}", "more than the limit of 50"),
        (b'"' + b"x" * 101 + b'"', "longer than the limit"),
        (b"[" + b" " * 5000 + b"]", "larger than the limit"),
        (b'{"a": NaN}', "holds NaN"),
        (b'{"a": -Infinity}', "holds -Infinity"),
        (b'{"a": 1, "a": 2}', "holds the key 'a' twice"),
        (b'\xef\xbb\xbf{"a": 1}', "byte-order mark"),
        (b'{"a": "\xe4"}', r"not UTF-8 text \(at byte 7\)"),
        (b'{"a": ', "not valid JSON"),
    ],
)
def test_untrusted_json_is_refused_in_one_line_naming_the_problem(text, problem):
    with pytest.raises(bounded_json.UntrustedJSONError, match=problem) as refused:
        bounded_json.loads(text, SMALL)
    assert "\n" not in str(refused.value)


def test_json_within_the_limits_reads_as_json_does():
    text = b'{"a": [1, 2.5, "x", {"b": null}], "c": "[{\\"not nesting"}'
    assert bounded_json.loads(text, SMALL) == {"a": [1, 2.5, "x", {"b": None}], "c": '[{"not nesting'}


def test_nesting_far_past_the_recursion_limit_is_refused_not_a_recursion_error():
    with pytest.raises(bounded_json.UntrustedJSONError, match="nested deeper"):
        bounded_json.loads(b"[" * 500_000 + b"]" * 500_000)


def test_an_impossible_layer_is_refused_with_the_estimate_and_the_limit():
    estimate = memory.layer_estimate(10**9, 10**9, 2)
    with pytest.raises(BadInput, match=r"needs at least .* GiB .* but only .* of host memory"):
        memory.check(estimate, [RunConfig(world_size=2, device="cpu")])


def test_the_default_runs_fit_well_inside():
    """Positive control of the refusal: what the suite and the README run is never refused,
    nor called large, on a host with a few GiB free."""
    from fsdpqdiag.stack.models import PRESETS

    available = memory.host_available_bytes()
    assert available is not None and available > 1 << 30
    runs = [RunConfig(world_size=2, device="cpu")]
    assert memory.check(memory.layer_estimate(1024, 1024, 2), runs) is None
    assert memory.check(memory.model_estimate(PRESETS["tiny-llama"], "tiny-llama"), runs) is None
    # TinyLlama-1.1B's 1.1 B parameters, counted from its geometry.
    assert 1.0e9 < memory.model_parameters(PRESETS["tinyllama-1.1b"]) < 1.2e9


def test_cli_refuses_before_launch(monkeypatch):
    from fsdpqdiag.cli import app
    from fsdpqdiag.launcher import launch

    def tripwire(*args, **kwargs):
        raise AssertionError("an impossible geometry would have started a rank")

    monkeypatch.setattr(launch, "launch", tripwire)
    runner = CliRunner()
    huge = ["--in-features", "1000000000", "--out-features", "1000000000"]
    result = runner.invoke(app, ["reproduce", "--device", "cpu", *huge])
    assert result.exit_code == 2 and "needs at least" in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    result = runner.invoke(app, ["reproduce", "--device", "cpu", "--json", "-", "--markdown", "-"])
    assert result.exit_code == 2 and "two outputs are - (stdout)" in result.stderr, result.stderr

"""Preset geometry fits every bitsandbytes kernel path (no model is built here)."""

import pytest

from fsdpqdiag.stack import models


def _projection_out_features(spec: dict) -> dict[str, int]:
    head_dim = spec.get("head_dim") or spec["hidden_size"] // spec["num_attention_heads"]
    return {
        "q_proj": spec["num_attention_heads"] * head_dim,
        "k_proj": spec["num_key_value_heads"] * head_dim,
        "v_proj": spec["num_key_value_heads"] * head_dim,
        "o_proj": spec["hidden_size"],
        "gate_proj": spec["intermediate_size"],
        "up_proj": spec["intermediate_size"],
        "down_proj": spec["hidden_size"],
    }


@pytest.mark.parametrize("name", sorted(models.PRESETS))
def test_every_quantized_projection_fits_the_cpu_repack(name):
    # bitsandbytes' AVX512-BF16 CPU path asserts out_features % 32 == 0 at the first
    # inference forward; a preset that misses it turns every cell into an ERROR there.
    spec = models.PRESETS[name]
    for projection, out_features in _projection_out_features(spec).items():
        assert out_features % models.REPACK_BLOCK_N == 0, (name, projection, out_features)
    assert spec["hidden_size"] % 2 == 0 and spec["intermediate_size"] % 2 == 0


def test_the_switch_is_validated(monkeypatch):
    from fsdpqdiag.stack import bnb_cpu_path

    monkeypatch.setenv(bnb_cpu_path.ENV, "maybe")
    with pytest.raises(ValueError, match="expected one of on, off"):
        bnb_cpu_path.override()
    monkeypatch.setenv(bnb_cpu_path.ENV, "")
    assert bnb_cpu_path.override() is None
    monkeypatch.setenv(bnb_cpu_path.ENV, "OFF")
    assert bnb_cpu_path.override() is False

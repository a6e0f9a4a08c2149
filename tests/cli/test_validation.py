"""Input checked before launch, in the library (what the CLI rows of test_bad_input.py rely
on): geometry against what bitsandbytes can pack, torchrun variables, model directories and
the model cache, and repeats in repeatable options (merged: asked twice is asked once)."""

import json

import pytest

from fsdpqdiag import api
from fsdpqdiag.analyses import matrix as mx
from fsdpqdiag.core.config import STORAGE_BYTES, packing_problem
from fsdpqdiag.launcher import launch
from fsdpqdiag.stack.models import ModelSourceError, preset_dir, resolve_model


@pytest.mark.parametrize("storage", sorted(STORAGE_BYTES))
@pytest.mark.parametrize("shape", [(7, 7), (6, 6), (2, 3), (4, 2), (64, 64), (3, 1)])
def test_packing_problem_agrees_with_bitsandbytes(storage, shape):
    # The refusal must be exactly bitsandbytes' own limit: quantize for real and compare.
    import bitsandbytes.functional as F
    import torch

    in_features, out_features = shape
    weight = torch.randn(out_features, in_features, dtype=torch.bfloat16)
    try:
        F.quantize_4bit(weight, quant_storage=getattr(torch, storage))
        packable = True
    except RuntimeError:
        packable = False
    assert (packing_problem(in_features, out_features, storage) is None) == packable


def test_repeats_of_repeatable_options_are_merged_in_order():
    assert api.merged([2, 1, 2, 1]) == [2, 1]
    assert api.check_probes(["full-tensor-crash", "nan-canonicalization", "full-tensor-crash"]) == [
        "full-tensor-crash",
        "nan-canonicalization",
    ]
    runs = api.run_configs([1, 2, 1], "cpu", "auto", 10.0, None)
    assert [run.world_size for run in runs] == [1, 2]
    assert [cell.name for cell in mx.select_cells(["B", "A", "B"])] == ["B", "A"]
    # bf16 and bfloat16 name one storage dtype: one cell, not two runs of it
    assert len(mx.select_cells(grid=["quant_storage=bf16,bfloat16,fp16"])) == 2


def test_one_grid_dimension_given_twice_is_refused():
    with pytest.raises(ValueError, match="already given"):
        mx.select_cells(grid=["quant_type=nf4", "quant_type=fp4"])


@pytest.mark.parametrize("timeout", [float("nan"), float("inf"), -1.0, 0.0])
def test_timeout_must_be_finite_and_positive(timeout):
    with pytest.raises(api.BadInput, match="finite"):
        api.run_configs([1], "cpu", "auto", timeout, None)


GOOD_JOB = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "29500"}


@pytest.mark.parametrize(
    "job, message",
    [
        ({}, None),
        ({"MASTER_ADDR": "h", "MASTER_PORT": "1"}, None),  # not a rank: harmless
        (GOOD_JOB, None),
        ({**GOOD_JOB, "RANK": "5"}, "RANK=5 is outside 0..1"),
        ({**GOOD_JOB, "LOCAL_RANK": "-1"}, "LOCAL_RANK=-1 is outside"),
        ({**GOOD_JOB, "WORLD_SIZE": "two"}, "WORLD_SIZE='two' is not an integer"),
        ({**GOOD_JOB, "WORLD_SIZE": "0"}, "WORLD_SIZE=0 must be >= 1"),
        ({**GOOD_JOB, "MASTER_PORT": "70000"}, "MASTER_PORT=70000 is not a port"),
        ({"RANK": "0"}, "half-set torchrun environment"),
        ({key: v for key, v in GOOD_JOB.items() if key != "MASTER_ADDR"}, "no MASTER_ADDR"),
    ],
)
def test_torchrun_variables_are_checked(monkeypatch, job, message):
    for key in launch.JOB_VARIABLES:
        monkeypatch.delenv(key, raising=False)
    for key, value in job.items():
        monkeypatch.setenv(key, value)
    if message is None:
        launch.check_job_environment()
    else:
        with pytest.raises(ValueError, match=message):
            launch.check_job_environment()


def _model_dir(tmp_path, name, config, weights=()):
    directory = tmp_path / name
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(config))
    for weight in weights:
        (directory / weight).write_bytes(b"")
    return directory


def test_model_directories_that_cannot_be_a_causal_lm_are_refused(tmp_path):
    bert = _model_dir(
        tmp_path, "bert", {"model_type": "bert", "architectures": ["BertForMaskedLM"]}, ["model.safetensors"]
    )
    with pytest.raises(ModelSourceError, match="BertForMaskedLM, not a causal LM"):
        resolve_model(str(bert))
    llama = {"model_type": "llama", "architectures": ["LlamaForCausalLM"]}
    with pytest.raises(ModelSourceError, match="no weights"):
        resolve_model(str(_model_dir(tmp_path, "config-only", llama)))
    assert resolve_model(str(_model_dir(tmp_path, "ok", llama, ["model.safetensors"]))).name == "ok"


def test_a_model_cache_that_is_a_file_is_refused(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    cache.write_text("a file, not a directory")
    monkeypatch.setenv("FSDPQDIAG_CACHE", str(cache))
    with pytest.raises(ModelSourceError, match="cannot build the preset in FSDPQDIAG_CACHE"):
        preset_dir("tiny-llama")
    assert cache.read_text() == "a file, not a directory"

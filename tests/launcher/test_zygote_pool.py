"""What a zygote imports before a launch forks, and which launches share one (pure: no process
started)."""

from fsdpqdiag.core.config import RunConfig
from fsdpqdiag.launcher.batch import Item, batch_task
from fsdpqdiag.launcher.rank_start import _key
from fsdpqdiag.launcher.zygote import WARM_MODULES, preload_modules


def test_the_zygote_imports_what_a_launchs_tasks_need_for_their_configurations():
    from fsdpqdiag.analyses import preflight
    from fsdpqdiag.analyses.matrix.task import NAME as CELL

    run = RunConfig(world_size=2, device="cpu")
    head = preflight.NAME
    layer = batch_task([Item(head, head, {"linear": {}}), Item("n", "nan-canonicalization", {})], run)
    assert preload_modules(layer) == ["bitsandbytes"]
    # the preflight of a model counts its FSDP units: it loads the model through transformers
    model = batch_task([Item(head, head, {"model": "/m"})], run)
    assert preload_modules(model) == ["bitsandbytes", "transformers", *WARM_MODULES["transformers"]]
    # a matrix cell loads its model whether or not --model named one
    assert preload_modules(batch_task([Item("A", CELL, {"model": None})], run))[1] == "transformers"
    assert preload_modules(batch_task([Item("i", "int8-params", {})], run)) == ["bitsandbytes", "peft"]


def test_only_what_is_read_at_import_parts_the_zygotes():
    base = {"PATH": "/usr/bin", "OMP_NUM_THREADS": "1"}
    # pytest rewrites one for every test; torch sets the other when the process first compiles
    later = {**base, "PYTEST_CURRENT_TEST": "t (call)", "TORCHINDUCTOR_CACHE_DIR": "/tmp/torchinductor_u"}
    assert _key(later) == _key(base)
    assert _key({**base, "OMP_NUM_THREADS": "2"}) != _key(base)
    assert _key({**base, "FSDPQDIAG_BNB_CPU_REPACK": "on"}) != _key(base)

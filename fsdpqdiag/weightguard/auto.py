"""Install the weight guard in a process that will call ``fully_shard``, with no code change.

``fsdpqdiag watch`` puts ``_watch_site/`` first on ``PYTHONPATH``; its ``sitecustomize`` calls
``install()`` in every Python process the command starts. Nothing here imports torch: a meta path
finder waits for ``torch.distributed.fsdp`` to be imported, then wraps its ``fully_shard`` (and
applies ``--inject``'s fault, the same reversible patch the probes use, and ``--fix``'s workaround,
process-wide as ``fsdpqdiag.fixes.apply`` does, before anything is sharded). Each module sharded is
remembered; at the first forward of any of them, after FSDP2's own pre-forward (lazy init, root
unshard), the guard attaches to the outermost sharded modules, so the per-layer calls and the
root call of a script all end up under one guard, set up before any guarded layer unshards.
"""

from __future__ import annotations

import functools
import importlib.abc
import os
import sys

from fsdpqdiag import envvars
from fsdpqdiag.weightguard import job

FSDP_MODULE = "torch.distributed.fsdp"
_state: dict = {
    "installed": False, "patched": False, "sharded": [], "hooks": [], "guards": [], "undo": None, "fix": None,
}  # fmt: skip


class _FsdpImportWatcher(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != FSDP_MODULE:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        original = loader.exec_module

        def exec_module(module) -> None:
            original(module)
            _patch(module)

        loader.exec_module = exec_module
        return spec


def install() -> None:
    """Arm the guard in this process (idempotent); a no-op outside ``fsdpqdiag watch``."""
    if _state["installed"] or not os.environ.get(envvars.GUARD_DIR):
        return
    _state["installed"], _state["pid"] = True, os.getpid()
    if job.claim_rank_process():
        # A rank whose script never imports FSDP still joins the job's gather at its exit: each
        # node's watch then knows which node writes the report, even of "nothing checked".
        import atexit

        _state["rank_process"] = True
        atexit.register(_gather_job)
    module = sys.modules.get(FSDP_MODULE)
    if module is not None:
        _patch(module)
    else:
        sys.meta_path.insert(0, _FsdpImportWatcher())


def _patch(fsdp) -> None:
    if _state["patched"]:
        return
    _state["patched"] = True
    original = fsdp.fully_shard

    @functools.wraps(original)
    def fully_shard(module, *args, **kwargs):
        result = original(module, *args, **kwargs)
        for sharded in module if isinstance(module, (list, tuple)) else [module]:
            _remember(sharded)
        return result

    fsdp.fully_shard = fully_shard
    _gather_at_close()
    for name in ("torch.distributed.fsdp._fully_shard", "torch.distributed._composable.fsdp"):
        owner = sys.modules.get(name)
        if owner is not None and getattr(owner, "fully_shard", None) is original:
            owner.fully_shard = fully_shard
    inject = os.environ.get(envvars.GUARD_INJECT)
    if inject:
        from fsdpqdiag.stack import faults

        rank = int(os.environ.get("RANK", "0"))
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        _state["undo"] = faults.get(inject).apply(rank, world_size)
    if os.environ.get(envvars.GUARD_FIX):
        _apply_fix(os.environ[envvars.GUARD_FIX])


def _gather_at_close() -> None:
    """At the guard's close, while the job's process group still stands (the script's
    ``destroy_process_group``, else this process's exit), gather every rank's record over the
    job (``weightguard.job``): each node's ``watch`` then knows the whole job."""
    import atexit

    import torch.distributed as dist

    original = dist.destroy_process_group

    @functools.wraps(original)
    def destroy_process_group(group=None):
        if group is None or group is dist.group.WORLD:
            _gather_job()
        return original(group)

    dist.destroy_process_group = destroy_process_group
    atexit.register(_gather_job)


def _gather_job() -> None:
    if _state.get("gathered") or _state.get("pid", os.getpid()) != os.getpid():
        return
    _state["gathered"] = True
    records = []
    try:
        for guard in _state["guards"]:
            guard._finish_checks()
            records.append(guard.state())
        records += [_state["attach_failure"]] if _state.get("attach_failure") else []
        job.publish_and_gather(
            records, os.environ[envvars.GUARD_DIR], agent_store=_state.get("rank_process", False)
        )
    except Exception:  # noqa: BLE001 - never the reason a training run fails; watch reads locals
        pass


def _apply_fix(name: str) -> None:
    """Apply the workaround before anything is sharded; one that fails leaves the run going
    unfixed, and the report says so (the record's ``fix.error``)."""
    from fsdpqdiag import fixes

    _state["fix"] = {"name": name, "error": None}
    try:
        _state["fix_handle"] = fixes.apply(name)
    except Exception as exc:  # noqa: BLE001 - never the reason a training run fails
        _state["fix"]["error"] = f"{type(exc).__name__}: {exc}"[:500]


def _remember(module) -> None:
    _state["sharded"].append(module)
    # After FSDP2's pre-forward (registered with prepend=True): lazy init is done by then.
    _state["hooks"].append(module.register_forward_pre_hook(_attach_once))


def _outermost(modules: list) -> list:
    inner = set()
    for outer in modules:
        for child in outer.modules():
            if child is not outer:
                inner.add(id(child))
    roots, seen = [], set()
    for module in modules:
        if id(module) not in inner and id(module) not in seen:
            seen.add(id(module))
            roots.append(module)
    return roots


def _attach_once(module, args) -> None:
    from fsdpqdiag.weightguard.guard import Guard

    for handle in _state["hooks"]:
        handle.remove()
    _state["hooks"] = []
    roots = _outermost(_state["sharded"])
    _state["sharded"] = []
    try:
        _state["guards"].append(
            Guard(
                roots,
                params=os.environ.get(envvars.GUARD_PARAMS, "quantized"),
                action=os.environ.get(envvars.GUARD_ACTION, "report"),
                every=int(os.environ.get(envvars.GUARD_EVERY, "1")),
                state_dir=os.environ[envvars.GUARD_DIR],
                injected=os.environ.get(envvars.GUARD_INJECT) or None,
                fix=_state["fix"],
                argv=list(sys.argv),
            )
        )
    except Exception as exc:  # noqa: BLE001 - the run goes on unguarded; the report says why
        _record_attach_failure(exc)


def _record_attach_failure(exc: BaseException) -> None:
    import json
    import traceback
    from pathlib import Path

    from fsdpqdiag.report.model import atomic_write_text
    from fsdpqdiag.weightguard.guard import STATE_SCHEMA

    record = {
        "schema": STATE_SCHEMA,
        "rank": int(os.environ.get("RANK", "0")),
        "world_size": int(os.environ.get("WORLD_SIZE", "1")),
        "pid": os.getpid(),
        "argv": list(sys.argv),
        "injected": os.environ.get(envvars.GUARD_INJECT) or None,
        "fix": _state["fix"],
        "guarded": [],
        "findings": [],
        "errors": [f"the guard could not attach: {type(exc).__name__}: {exc}"[:500]],
        "traceback": traceback.format_exc()[-4000:],
    }
    _state["attach_failure"] = record
    record_path = Path(os.environ[envvars.GUARD_DIR]) / f"guard-{os.getpid()}-attach.json"
    atomic_write_text(record_path, json.dumps(record))

"""Put first on PYTHONPATH by ``fsdpqdiag watch``: arms the weight guard in this process.

A ``sitecustomize`` the environment already had (a distribution's, a cluster's) is found on the
rest of ``sys.path`` and run first, so watching a command never takes it away.
"""


def _chain_to_the_next_sitecustomize() -> None:
    import importlib.machinery
    import importlib.util
    import os
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    rest = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", rest)
    if spec is None or spec.loader is None:
        return
    module = importlib.util.module_from_spec(spec)
    sys.modules["_fsdpqdiag_chained_sitecustomize"] = module
    spec.loader.exec_module(module)


def _arm() -> None:
    try:
        from fsdpqdiag.weightguard import auto as guard_auto
    except Exception:  # noqa: BLE001 - a process without fsdpqdiag importable runs unguarded
        return
    guard_auto.install()


_chain_to_the_next_sitecustomize()
_arm()

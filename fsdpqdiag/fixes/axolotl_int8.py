"""Patches in the spirit of axolotl's ``monkeypatch.fsdp2_qlora`` for int8/uint8 parameters.

Two reversible patches, installed by ``prepare`` (they must be in place before
``fully_shard``, because FSDP2 decides a parameter's all-gather dtype while wrapping):

* ``FSDPParam.init_dtype_attrs`` guard: mixed precision must never cast a non-float
  (uint8 packed 4-bit, int8) parameter to ``param_dtype``. Recent torch already clamps
  ``param_dtype`` to None for non-float parameters; the guard enforces it on a torch that
  does not, and is a no-op otherwise. Combined with ``quant_storage=uint8`` (this
  workaround's build override) packed storage never meets a float copy.
* ``Linear8bitLt._save_to_state_dict`` through DTensor: after ``fully_shard`` the weight is
  a DTensor, and bitsandbytes reads ``self.weight.SCB``, which DTensor does not proxy to
  its local ``Int8Params``: the row scales silently vanish from the state dict. Axolotl
  swaps the DTensor for its local tensor while saving. Measured on torch 2.13 that is not
  enough: FSDP2's shard is a plain ``Tensor`` (the ``Int8Params`` subclass and its ``SCB``
  are gone at every world size), and swapping would save a shard as the whole weight at
  WS>1. So, as cached-ref does for QuantState, ``prepare`` (before ``fully_shard``)
  captures each module's ``SCB``; the patched save keeps the DTensor weight and adds the
  captured ``SCB`` (and ``weight_format``) only where bitsandbytes left it out.
"""

from __future__ import annotations

import sys
import weakref

from fsdpqdiag.fixes.base import Handle, Workaround


def _guarded_init_dtype_attrs(original):
    def init_dtype_attrs(self, mp_policy):
        original(self, mp_policy)
        if not self.sharded_param.dtype.is_floating_point:
            self.param_dtype = None

    init_dtype_attrs._fsdpqdiag_original = original
    return init_dtype_attrs


def _dtensor_save_to_state_dict(captured_scb: weakref.WeakKeyDictionary):
    def make(original):
        def _save_to_state_dict(self, destination, prefix, keep_vars):
            original(self, destination, prefix, keep_vars)
            local = getattr(self.weight, "_local_tensor", None)
            scb = getattr(local, "SCB", None)
            if scb is None:
                scb = captured_scb.get(self)
            if scb is None or prefix + "SCB" in destination:
                return
            if not self.state.has_fp16_weights:
                import torch

                destination[prefix + "SCB"] = scb if keep_vars else scb.detach()
                destination[prefix + "weight_format"] = torch.tensor(0, dtype=torch.uint8)

        _save_to_state_dict._fsdpqdiag_original = original
        return _save_to_state_dict

    return make


def _patch(owner, attribute: str, make) -> callable:
    original = owner.__dict__[attribute]
    setattr(owner, attribute, make(original))
    return lambda: setattr(owner, attribute, original)


def _capture_scb(model) -> weakref.WeakKeyDictionary:
    import bitsandbytes as bnb

    captured = weakref.WeakKeyDictionary()
    for module in model.modules() if model is not None else ():
        if isinstance(module, bnb.nn.Linear8bitLt):
            scb = getattr(module.weight, "SCB", None)
            scb = scb if scb is not None else getattr(module.state, "SCB", None)
            if scb is not None:
                captured[module] = scb.detach().clone()
    return captured


def install(model=None) -> Handle:
    """Install both patches now, capturing ``model``'s int8 row scales (call before
    ``fully_shard``); the handle's undo() removes them."""
    import bitsandbytes as bnb
    from torch.distributed.fsdp._fully_shard._fsdp_param import FSDPParam

    captured_scb = _capture_scb(model)

    return Handle(
        undo_fns=[
            _patch(FSDPParam, "init_dtype_attrs", _guarded_init_dtype_attrs),
            _patch(bnb.nn.Linear8bitLt, "_save_to_state_dict", _dtensor_save_to_state_dict(captured_scb)),
        ]
    )


def prepare(model) -> Handle:
    return install(model)


def _capturing_init_sharded_param(captured_scb: weakref.WeakKeyDictionary, undo_fns: list):
    """Capture a ``Linear8bitLt``'s row scales as FSDP2 takes its weight, before the shard (a
    plain tensor) replaces the ``Int8Params`` that carried them; patch its save on the first
    one seen, when bitsandbytes is surely imported (installing may run inside its import)."""

    def make(original):
        def _init_sharded_param(self, param, *args, **kwargs):
            bnb = sys.modules.get("bitsandbytes")
            module = self._module_info.module
            if bnb is not None and isinstance(module, bnb.nn.Linear8bitLt):
                if not hasattr(bnb.nn.Linear8bitLt._save_to_state_dict, "_fsdpqdiag_original"):
                    saving = _dtensor_save_to_state_dict(captured_scb)
                    undo_fns.append(_patch(bnb.nn.Linear8bitLt, "_save_to_state_dict", saving))
                scb = getattr(param, "SCB", None)
                scb = scb if scb is not None else getattr(module.state, "SCB", None)
                if scb is not None and self._module_info.param_name == "weight":
                    captured_scb[module] = scb.detach().clone()
            return original(self, param, *args, **kwargs)

        return _init_sharded_param

    return make


def install_process_wide() -> Handle:
    """Both patches for every model this process shards from now on; the row scales are
    captured as FSDP2 wraps each ``Linear8bitLt``. The build override (uint8 storage) is the
    script's to make: without it, bf16 packed storage is all-gathered as before."""
    from torch.distributed.fsdp._fully_shard._fsdp_param import FSDPParam

    captured_scb: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
    handle = Handle()
    capturing = _capturing_init_sharded_param(captured_scb, handle.undo_fns)
    handle.undo_fns += [
        _patch(FSDPParam, "init_dtype_attrs", _guarded_init_dtype_attrs),
        _patch(FSDPParam, "_init_sharded_param", capturing),
    ]
    return handle


WORKAROUND = Workaround(
    name="axolotl-int8",
    description="axolotl-style: uint8 storage, no mixed-precision cast of int params, int8 SCB via DTensor",
    prepare=prepare,
    build_overrides={"quant_storage": "uint8"},
    install=install_process_wide,
)

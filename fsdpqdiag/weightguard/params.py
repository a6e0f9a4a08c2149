"""The weight guard's parameters: which it guards, and what forward's bytes must match.

For each FSDP2 parameter it guards: where each rank's shard lies in the unsharded tensor, and
the digests of every rank's slice that forward's bytes must match.

A tensor-subclass parameter that implements FSDP2's all-gather extension (``fsdp_pre_all_gather``
/ ``fsdp_post_all_gather``; torchao's ``NF4Tensor``, the weight of torchtune's QLoRA) has no
bytes of its own: FSDP2 all-gathers the inner tensors its ``fsdp_pre_all_gather`` returns and
``fsdp_post_all_gather`` rebuilds the subclass around them for forward. Each of those inner
tensors is guarded as a weight of its own, named by its attribute path (``...weight.quantized_data``,
``.quantized_scalers``, ``.quantization_factor`` for an ``NF4Tensor``). Nothing here imports torchao:
the class is recognized by the extension's methods.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fsdpqdiag.weightguard.digest import (
    MASK32,
    MASK64,
    digest,
    host,
    host32,
    raw_bytes,
    row_width,
    word_digest,
)

QUANTIZED_MODULES = ("Linear4bit", "LinearNF4", "LinearFP4", "Linear8bitLt")
QUANTIZED_PARAM_TYPES = ("Params4bit", "Int8Params")
# FSDP2's all-gather extension: a parameter class with both is all-gathered through its inner tensors.
EXTENSION_METHODS = ("fsdp_pre_all_gather", "fsdp_post_all_gather")


@dataclass
class Slice:
    rank: int
    start: int
    numel: int
    digest: int


@dataclass
class GuardedParam:
    name: str
    module_name: str
    module: Any
    # The FSDP unit (the module ``fully_shard`` was applied to) whose unshard gathers it.
    unit: Any
    param_name: str
    fsdp_param: Any
    kind: str
    trainable: bool
    cast_dtype: Any
    group: Any
    numel: int = 0
    shard_numel: int = 0
    slices_nonempty: list = field(default_factory=list)
    dtype: str = ""
    start: int = 0
    shard_digest: int = 0
    slices: list[Slice] = field(default_factory=list)
    # The word digest (``digest.word_digest``, modulo 2**32) of the unsharded tensor, the sum of
    # its slices' digests; ``expected_legacy``: the per-element digest, for the old path only.
    expected: int = 0
    expected_legacy: int = 0
    width: int = 0
    checks: int = 0
    mismatches: int = 0
    first_step: int | None = None
    last_step: int | None = None
    localize_pending: bool = False
    warned: bool = False
    # The hot path's precomputed pieces (``verify``): the torch dtype forward must receive, the
    # row and column factors of the unsharded tensor's words and (on a CPU) the int32 scratch
    # its products are written into; the old path's word dtype and multiplier table.
    torch_dtype: Any = None
    columns: Any = None
    factors: Any = None
    scratch: Any = None
    words: Any = None
    table: Any = None
    # The attribute of a tensor-subclass parameter that is guarded (``quantized_data`` of an
    # NF4Tensor): the shard's and the unsharded parameter's inner tensor of that name; None for
    # a parameter with storage of its own.
    inner: str | None = None

    def shard(self):
        local = self.fsdp_param.sharded_param._local_tensor
        if self.inner is not None:
            return getattr(local, self.inner)
        return local if self.cast_dtype is None else local.to(self.cast_dtype)

    def received(self, tensor):
        """What of the unsharded parameter ``tensor`` this entry digests: the tensor itself, or
        the inner tensor forward's subclass was rebuilt around."""
        return tensor if self.inner is None else getattr(tensor, self.inner)

    def unsharded(self):
        """What this entry digests of its module's parameter now."""
        return self.received(getattr(self.module, self.param_name))


def extends_all_gather(local) -> bool:
    """Whether FSDP2 all-gathers this parameter through the all-gather extension."""
    return all(callable(getattr(local, name, None)) for name in EXTENSION_METHODS)


def gathers_inner_tensors(local) -> bool:
    """Whether what FSDP2 all-gathers for this parameter is its inner tensors (a wrapper
    subclass whose class implements the extension, as torchao's ``NF4Tensor``), not storage of
    its own. The ``fsdp2-bytes`` fix installs the extension on a ``Params4bit`` instance: the
    bytes gathered, and digested, are still the parameter's own."""
    cls = type(local)
    return callable(getattr(cls, "__tensor_flatten__", None)) and all(
        callable(getattr(cls, name, None)) for name in EXTENSION_METHODS
    )


def is_quantized(module, param_name: str, local) -> str | None:
    import torch

    if extends_all_gather(local):
        return type(local).__name__
    if type(local).__name__ in QUANTIZED_PARAM_TYPES:
        return type(local).__name__
    if param_name == "weight" and any(type(module).__name__ == n for n in QUANTIZED_MODULES):
        return type(module).__name__
    if local.dtype in (torch.uint8, torch.int8):
        return "int"
    return None


def fsdp_params(modules) -> list:
    """Every FSDPParam of every FSDP unit under ``modules``, once each, with its param group
    and the unit's module."""
    seen, found = set(), []
    for root in modules:
        for module in root.modules():
            get_state = getattr(module, "_get_fsdp_state", None)
            if get_state is None:
                continue
            state = get_state()
            groups = getattr(state, "_fsdp_param_groups", None)
            if groups is None:  # torch before per-param meshes: one group or None
                group = getattr(state, "_fsdp_param_group", None)
                groups = [group] if group is not None else []
            for group in groups:
                for fsdp_param in group.fsdp_params:
                    if id(fsdp_param) not in seen:
                        seen.add(id(fsdp_param))
                        found.append((fsdp_param, group, module))
    return found


def cast_dtype(fsdp_param, group):
    """What FSDP2's mixed precision casts this parameter to before the all-gather (None: no cast),
    read from the parameter after lazy init, else by ``FSDPParam.init_dtype_attrs``' rule."""
    if hasattr(fsdp_param, "param_dtype"):
        return fsdp_param.param_dtype
    wanted = getattr(getattr(group, "mp_policy", None), "param_dtype", None)
    dtype = fsdp_param.sharded_param.dtype
    if wanted is None or wanted == dtype or not dtype.is_floating_point:
        return None
    return wanted


def flat_start(sharded) -> int | None:
    """The flat element index where this rank's shard begins in the unsharded tensor; None where
    the shard is not one contiguous run of it (a shard on a dimension other than 0)."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if not all(isinstance(p, Replicate) or (type(p) is Shard and p.dim == 0) for p in sharded.placements):
        return None
    _, offset = compute_local_shape_and_global_offset(sharded.shape, sharded.device_mesh, sharded.placements)
    row = 1
    for size in sharded.shape[1:]:
        row *= size
    return int(offset[0]) * row if offset else 0


def collect(roots: list, params: str) -> tuple[list[GuardedParam], list[dict]]:
    """The parameters to guard under ``roots`` (``params``: "quantized" or "all"), and those
    that cannot be guarded, with why."""
    names = {}
    for root in roots:
        for name, module in root.named_modules():
            names.setdefault(id(module), name)
    guarded, skipped = [], []
    for fsdp_param, group, unit in fsdp_params(roots):
        info = fsdp_param._module_info
        module, param_name = info.module, info.param_name
        sharded = fsdp_param.sharded_param
        local = sharded._local_tensor
        module_name = names.get(id(module), type(module).__name__)
        qualified = f"{module_name}.{param_name}" if module_name else param_name
        quantized = is_quantized(module, param_name, local)
        if params == "quantized" and quantized is None:
            continue
        start = flat_start(sharded)
        if start is None:
            skipped.append({"parameter": qualified, "reason": f"placements {sharded.placements}"})
            continue
        trainable = bool(sharded.requires_grad)
        entry = GuardedParam(
            name=qualified,
            module_name=module_name,
            module=module,
            unit=unit,
            param_name=param_name,
            fsdp_param=fsdp_param,
            kind=quantized or ("trainable" if trainable else "frozen"),
            trainable=trainable,
            # Quantized storage must reach forward as it is: a cast is itself the bug.
            cast_dtype=None if quantized else cast_dtype(fsdp_param, group),
            group=getattr(getattr(fsdp_param, "mesh_info", None), "shard_process_group", None),
            numel=sharded.numel(),
            start=start,
        )
        if not gathers_inner_tensors(local):
            guarded.append(entry)
            continue
        inner, reason = inner_entries(entry, local)
        guarded += inner
        if reason:
            skipped.append({"parameter": qualified, "reason": reason})
    return guarded, skipped


def gathered_inner_names(fsdp_param, local) -> tuple[list[str], str | None]:
    """The attribute names of the inner tensors FSDP2 all-gathers for a parameter of an
    all-gather-extension class, in ``fsdp_pre_all_gather``'s order, or why they are unknown.
    The call is FSDP2's own, with its two signatures; it only returns the tensors to gather
    (an ``NF4Tensor``'s ``quantized_scalers``, ``quantization_factor``, ``quantized_data``)."""
    import inspect

    flatten = getattr(local, "__tensor_flatten__", None)
    if flatten is None:
        return [], f"{type(local).__name__} names no inner tensors (__tensor_flatten__)"
    names = list(flatten()[0])
    mesh = getattr(fsdp_param, "shard_mesh_from_root", None) or fsdp_param.mesh_info.mesh
    try:
        pre = local.fsdp_pre_all_gather
        if len(inspect.signature(pre).parameters) == 1:
            inputs, _ = pre(mesh)
        else:
            module = fsdp_param._module_info.module
            size, stride = fsdp_param._orig_size, fsdp_param._contiguous_orig_stride
            inputs, _ = pre(mesh, size, stride, module, getattr(fsdp_param, "mp_policy", None))
    except Exception as exc:  # noqa: BLE001 - the guard must not be what breaks a run
        return [], f"fsdp_pre_all_gather raised {type(exc).__name__}: {exc}"[:300]
    by_identity = {id(getattr(local, name, None)): name for name in names}
    gathered = [by_identity.get(id(tensor)) for tensor in inputs]
    if None in gathered:
        # Computed at each unshard (a cast of a trainable weight): no fixed bytes to digest.
        return [], f"{type(local).__name__}.fsdp_pre_all_gather gathers tensors that are not its attributes"
    return gathered, None


def inner_entries(entry: GuardedParam, local) -> tuple[list[GuardedParam], str | None]:
    """One entry per all-gathered inner tensor of a tensor-subclass parameter, each placed in
    its unsharded inner tensor in proportion to the shard's place in the parameter (FSDP2
    shards such a parameter on dim 0, which splits every gathered inner tensor in proportion:
    an ``NF4Tensor``'s codes two elements a byte, a scaler per 64-element block, ...)."""
    from dataclasses import replace

    names, reason = gathered_inner_names(entry.fsdp_param, local)
    outer_local = local.numel()
    found = []
    for name in names:
        inner_local = getattr(local, name).numel()
        numel, start = entry.numel * inner_local, entry.start * inner_local
        if outer_local == 0 or numel % outer_local or start % outer_local:
            return [], f"{entry.name}.{name} is not split in proportion to the shard"
        found.append(
            replace(
                entry,
                name=f"{entry.name}.{name}",
                inner=name,
                cast_dtype=None,
                numel=numel // outer_local,
                start=start // outer_local,
            )
        )
    return found, reason


def digest_shards(entries: list[GuardedParam], legacy: bool = False) -> None:
    """Digest each entry's shard at its global offset; one all-gather per process group
    (the FSDP shard group) gives every rank every slice's digest. ``legacy``: the per-element
    digests too, for the old per-weight path."""
    groups: dict[int, list[GuardedParam]] = {}
    for entry in entries:
        groups.setdefault(id(entry.group), []).append(entry)
    for members in groups.values():
        _digest_group(members, legacy)


def shard_word_digest(entry: GuardedParam, shard=None):
    """The word digest of this rank's shard at its byte offset in the unsharded tensor."""
    shard = entry.shard() if shard is None else shard
    return word_digest(raw_bytes(shard), entry.start * shard.element_size(), entry.width)


def _digest_group(members: list[GuardedParam], legacy: bool) -> None:
    import torch
    import torch.distributed as dist

    digests, legacies = [], []
    for entry in members:
        shard = entry.shard()
        entry.dtype = str(shard.dtype).removeprefix("torch.")
        entry.torch_dtype = shard.dtype
        entry.shard_numel = shard.numel()
        entry.width = row_width(entry.numel * shard.element_size())
        digests.append(shard_word_digest(entry, shard))
        if legacy:
            legacies.append(digest(shard, entry.start))
    digests += legacies
    # Where each shard lies never changes: it travels with the digests at set-up only.
    layout = torch.tensor(
        [v for entry in members for v in (entry.start, entry.shard_numel)],
        dtype=torch.int64,
        device=digests[0].device,
    )
    first = not members[0].slices
    mine = torch.cat([torch.stack(digests), layout]) if first else torch.stack(digests)
    group = members[0].group
    table = _gather_rows(mine, group)
    own = dist.get_rank(group) if dist.is_initialized() else 0
    _record_slices(members, table, first, own, legacy)


def _gather_rows(mine, group) -> list[list[int]]:
    """Every rank's row of ``mine`` in the shard group, on the host."""
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        return [mine.tolist()]
    size = dist.get_world_size(group)
    backend = str(dist.get_backend(group))
    # gloo cannot carry CUDA tensors through all_gather (pytorch#152645): host them.
    carrier = mine if "nccl" in backend else mine.cpu()
    gathered = torch.empty(size * carrier.numel(), dtype=torch.int64, device=carrier.device)
    # all_gather_single where torch has it: all_gather_into_tensor, its older name, warns
    # (FutureWarning) into the user's training log there.
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(gathered, carrier, group=group)
    return gathered.view(size, -1).tolist()


def _record_slices(
    members: list[GuardedParam], table: list[list[int]], first: bool, own: int, legacy: bool
) -> None:
    """Each member's slices and expected digest from the gathered rows: its word digests first,
    then (``legacy``) its per-element digests, then (at set-up only) each member's start and
    element count."""
    count = len(members)
    layout = count * (2 if legacy else 1)
    for index, entry in enumerate(members):
        if first:
            entry.slices = [
                Slice(rank, row[layout + 2 * index], row[layout + 2 * index + 1], 0)
                for rank, row in enumerate(table)
            ]
        for piece in entry.slices:
            piece.digest = host32(table[piece.rank][index])
        entry.shard_digest = host32(table[own][index])
        entry.slices_nonempty = [piece for piece in entry.slices if piece.numel > 0]
        entry.expected = sum(piece.digest for piece in entry.slices) & MASK32
        if legacy:
            entry.expected_legacy = sum(host(row[count + index]) for row in table) & MASK64

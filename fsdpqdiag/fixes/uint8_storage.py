"""Configuration-level mitigation: build the model with ``quant_storage=torch.uint8``.

FSDP2 applies mixed precision only to floating-point parameters and all-gathers mixed
dtypes as flat uint8, so uint8 packed storage never passes through a float copy. The
price: FSDP2 cannot then shard the packed weights together with bf16 parameters as one
dtype (bitsandbytes' FSDP guidance asks for quant_storage == model dtype), which this
verification measures rather than assumes.
"""

from __future__ import annotations

from fsdpqdiag.fixes.base import Handle, Workaround


def prepare(model) -> Handle:
    return Handle()


WORKAROUND = Workaround(
    name="uint8-storage",
    description="configuration: quant_storage=uint8, so packed storage is never a float",
    prepare=prepare,
    build_overrides={"quant_storage": "uint8"},
    not_installable="it is how the script builds its model: bnb_4bit_quant_storage=torch.uint8",
)

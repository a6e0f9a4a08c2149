"""The ``moe-expert-quant`` probe: uint8/int8 MoE expert parameters through FSDP2."""

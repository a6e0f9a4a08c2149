"""The ``quant-state-loss`` probe: ``Params4bit.quant_state`` across shard and unshard."""

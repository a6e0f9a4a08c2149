"""The ``int8-params`` probe: ``Int8Params`` / ``Linear8bitLt`` through FSDP2, stage by stage."""

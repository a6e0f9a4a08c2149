"""The stack under test, built and bent: models, the bitsandbytes CPU path, injected faults."""

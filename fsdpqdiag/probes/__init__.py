"""The probes ``reproduce`` runs, one module each; ``fsdpqdiag.tasks`` registers them."""

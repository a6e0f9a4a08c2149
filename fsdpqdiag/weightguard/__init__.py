"""The weight guard inside a user's own training run, and ``fsdpqdiag watch`` around it."""

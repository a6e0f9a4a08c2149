"""Integrations of the weight guard with training frameworks (imported on demand)."""

"""Shared types every layer uses: configuration, outcomes, verdicts, presentations, the task registry."""

"""Partial-rollout buffer policies (``fifo``: slime's pop_first)."""

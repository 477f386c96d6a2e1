"""Placement strategies: where train ranks and rollout engines go (``colocate``, ``decoupled``)."""

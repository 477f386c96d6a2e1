"""The embedded ``hf`` rollout engine: transformers generation in-process (CPU or one GPU), or one engine
actor per GPU (``pool.py``). Nothing heavy is imported here."""

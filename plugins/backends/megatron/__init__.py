"""The megatron train backend's CPU-side half: config derivation, HF <-> Megatron weight mapping,
the model bridge hook and the checkpoint converter. Importing this package imports no megatron."""

"""The ``sglang`` rollout backend: SGLang servers (or plugrl's own SGLang-API server around the
embedded ``hf`` engine) behind the real ``sglang_router``. Nothing is imported here."""

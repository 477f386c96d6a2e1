"""``TrainWorker``: the body of a train Ray actor; builds the selected train backend in-process.

Only plain data crosses the actor boundary: the config dict in, metric dicts and weight buckets out.
"""

from __future__ import annotations

import json
import random
from types import SimpleNamespace


class TrainWorker:
    def __init__(self, config: dict, total_optimizer_steps: int):
        from .plugins import load_plugins

        self.args = SimpleNamespace(**config)
        plugin_set = load_plugins()
        estimator = plugin_set.get("advantage_estimator", self.args.advantage_estimator)(self.args)
        backend_cls = plugin_set.get("train_backend", self.args.train_backend)
        self.backend = backend_cls(self.args, estimator=estimator, total_optimizer_steps=total_optimizer_steps)

    def train(self, rollout_id: int, data: dict) -> dict:
        return self.backend.train(rollout_id, data)

    def progress(self) -> dict:
        """Micro-batches done in the running ``train`` call (polled by the driver)."""
        return {"train": getattr(self.backend, "progress", (0, 0))}

    def export_weights(self, bucket_bytes: int | None = None) -> list:
        return self.backend.export_weights(bucket_bytes)

    def save(self, path: str) -> None:
        self.backend.save(path)

    def load(self, path: str) -> None:
        self.backend.load(path)

    def save_hf(self, path: str) -> None:
        self.backend.save_hf(path)

    def offload(self) -> None:
        self.backend.offload()

    def onload(self) -> None:
        self.backend.onload()

    def sft_warmup(self, path: str, *, steps: int, batch_size: int, lr: float, prompt_loss_weight: float,
                   seed: int) -> list[float]:
        """Supervised format warm-up on a JSONL of {prompt, response} rows (chat template applied)."""
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(self.args.hf_checkpoint)
        examples = []
        with open(path) as f:
            for line in f:
                if line.strip():
                    row = json.loads(line)
                    prompt = row["prompt"]
                    if self.args.apply_chat_template and isinstance(prompt, str):
                        prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                               tokenize=False, add_generation_prompt=True)
                    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
                    response_ids = tokenizer.encode(row["response"], add_special_tokens=False)
                    examples.append((prompt_ids + response_ids, len(response_ids)))
        rng = random.Random(seed)
        batches = []
        for _ in range(steps):
            chosen = rng.sample(examples, min(batch_size, len(examples)))
            batches.append(([e[0] for e in chosen], [e[1] for e in chosen]))
        return self.backend.sft_warmup(batches, lr=lr, prompt_loss_weight=prompt_loss_weight)

    def log_probs(self, sequences: list[list[int]], response_lengths: list[int]) -> list[list[float]]:
        """The trainer's response log-probs for fixed sequences (weight-push checks)."""
        import torch

        with torch.no_grad():
            lp, _ = self.backend._forward_response(self.backend.model, sequences, response_lengths, with_entropy=False)
        return [chunk.tolist() for chunk in lp.split(response_lengths)]

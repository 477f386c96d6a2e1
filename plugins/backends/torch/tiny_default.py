"""The embedded default run's assets: a tiny Qwen3-architecture checkpoint with a real HF tokenizer
and chat template, built locally (no model hub is reachable), and the bundled toy math data.

Built once on the driver and cached under ``$PLUGRL_CACHE`` (default ``~/.cache/plugrl``); the
directory is an ordinary HF checkpoint that ``AutoModelForCausalLM`` and ``AutoTokenizer`` load.

The toy task: "What is b - b + a?" with a in 0..9 and b in 10..99; the answer is the digit a. The
supervised warm-up teaches the output format and to answer with a digit picked at *random* among
those the question shows (b's two digits and a), so it cannot teach which one is right: after it a
policy is right about a third of the time at best. Learning that a is the answer is GRPO's job.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
from pathlib import Path

TINY_VERSION = "tiny-qwen3-v2"
DATA_DIR = Path(__file__).parent / "data"
TRAIN_FILE = DATA_DIR / "toy_math_train.jsonl"
EVAL_FILE = DATA_DIR / "toy_math_eval.jsonl"
SFT_FILE = DATA_DIR / "toy_math_format_sft.jsonl"

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
# Qwen-style ChatML template; a string prompt becomes one user message before rendering.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
INSTRUCTION = "Put the final answer in \\boxed{}."


def cache_root() -> Path:
    return Path(os.environ.get("PLUGRL_CACHE", Path.home() / ".cache" / "plugrl"))


def toy_question(a: int, b: int) -> str:
    return f"What is {b} - {b} + {a}? {INSTRUCTION}"


def format_response(answer: int | str) -> str:
    """The response shape deepscaler grades: reasoning closed by ``</think>``, then ``\\boxed{}``."""
    return f"<think>\n</think>\n\\boxed{{{answer}}}<|im_end|>"


def toy_rows(seed: int = 0, num_eval: int = 100) -> tuple[list[dict], list[dict]]:
    """All (a, b) with a in 0..9 and b in 10..99, split into train and a held-out eval set."""
    pairs = [(a, b) for a in range(10) for b in range(10, 100)]
    random.Random(seed).shuffle(pairs)
    rows = [{"prompt": toy_question(a, b), "label": str(a)} for a, b in pairs]
    return rows[num_eval:], rows[:num_eval]


def question_digits(question: str) -> list[str]:
    """The digits a toy question shows: both digits of b, then a."""
    match = re.search(r"What is (\d+) - \d+ \+ (\d+)\?", question)
    if match is None:
        raise ValueError(f"not a toy question: {question!r}")
    return [*match.group(1), match.group(2)]


def format_sft_rows(train_rows: list[dict], seed: int = 1) -> list[dict]:
    """Warm-up data: the prompts answered with a digit picked uniformly at *random* among the digits
    the question shows (b's two digits and a). It teaches the format and that an answer is read off
    the question, not which digit: a random pick is right about a third of the time, and GRPO has
    to learn that a is the one."""
    rng = random.Random(seed)
    return [{"prompt": r["prompt"], "response": format_response(rng.choice(question_digits(r["prompt"])))}
            for r in train_rows]


def write_bundled_data(directory: Path = DATA_DIR) -> None:
    """Regenerate the bundled files (they are committed; this documents how they were made)."""
    train, evaluation = toy_rows()
    directory.mkdir(parents=True, exist_ok=True)
    for path, rows in ((TRAIN_FILE, train), (EVAL_FILE, evaluation), (SFT_FILE, format_sft_rows(train))):
        with open(directory / path.name, "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")


def _corpus(train_rows: list[dict]) -> list[str]:
    texts = [r["prompt"] for r in train_rows] + [format_response(d) for d in range(10)]
    return texts + ["user", "assistant", "system", "The answer is 0123456789."]


def build_tokenizer(train_rows: list[dict]):
    """A byte-level BPE tokenizer trained on the toy corpus; digits are always single tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=384, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(_corpus(train_rows), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None,
        additional_special_tokens=["<|im_start|>", "<think>", "</think>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_config(vocab_size: int, eos_token_id: int, pad_token_id: int, **overrides):
    from transformers import Qwen3Config

    values = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
        rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=True, eos_token_id=eos_token_id,
        pad_token_id=pad_token_id, bos_token_id=None, torch_dtype="float32",
    )
    values.update(overrides)
    return Qwen3Config(**values)


def build_tiny_checkpoint(path: str | Path, *, seed: int = 0, bf16: bool = False, **config_overrides) -> Path:
    """Write a random-init tiny Qwen3 checkpoint + tokenizer to ``path`` (a normal HF directory).
    ``config_overrides`` may give another shape (the benchmarks' Qwen3-4B: the tiny tokenizer's ids
    are a subset of any larger ``vocab_size``); ``bf16`` initialises and stores it in bf16 (half the
    memory and disk of fp32) and, where CUDA is available, on the GPU: a 4B-parameter random init
    takes seconds there and minutes on the host's cores."""
    import torch
    from transformers import AutoModelForCausalLM

    path = Path(path)
    train_rows, _ = toy_rows()
    tokenizer = build_tokenizer(train_rows)
    if bf16:
        config_overrides.setdefault("torch_dtype", "bfloat16")
    vocab_size = config_overrides.pop("vocab_size", len(tokenizer))
    config = tiny_config(vocab_size, tokenizer.eos_token_id, tokenizer.pad_token_id, **config_overrides)
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16 if bf16 else previous)
    init_device = "cuda" if bf16 and torch.cuda.is_available() else "cpu"
    try:
        with torch.device(init_device):
            model = AutoModelForCausalLM.from_config(config)
    finally:
        torch.set_default_dtype(previous)
    # Build next to the target and rename: concurrent builders (tests, Ray workers) never see a
    # half-written directory, and the first finished build wins.
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=path.name + ".", dir=path.parent))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    del model
    if init_device == "cuda":
        # hand the init's memory back to the driver: the builder is often a benchmark's parent process
        # whose trainer runs in a child on the same GPU (a 4B model left 8.9 GiB cached there)
        torch.cuda.empty_cache()
    try:
        os.rename(tmp, path)
    except OSError:  # another process finished first (or the directory exists)
        shutil.rmtree(tmp, ignore_errors=True)
        if not (path / "config.json").exists():
            raise
    return path


def default_checkpoint() -> Path:
    """The cached default checkpoint, built on first use (a few seconds)."""
    path = cache_root() / TINY_VERSION
    if not (path / "config.json").exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        build_tiny_checkpoint(path)
    return path


def default_data() -> dict:
    """The bundled toy data files (the ``default_data`` trait of the torch backend's registration)."""
    return {"train": TRAIN_FILE, "eval": EVAL_FILE, "sft": SFT_FILE}


if __name__ == "__main__":  # python -m plugrl.plugins.backends.torch.tiny_default  regenerates the data files
    write_bundled_data()

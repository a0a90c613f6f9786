"""A tiny GPT-2 built from scratch: random weights and a byte-level BPE tokenizer trained here.

It has GPT-2's architecture and tokenizer type, so it exercises the real loading, batching and
detokenizing code, in well under a second per generation and with no download.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import ByteLevelBPETokenizer
from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

CORPUS = """\
The quick brown fox jumps over the lazy dog. What is AI? Artificial intelligence is the study of
machines that learn, reason and act. Paris is the capital of France; Rome is the capital of Italy.
Question: what is the weather like today? Answer: it is sunny and warm, with a light breeze.
Language models predict the next token from the tokens before it. Batching many requests together
keeps the processor busy. Stop strings end generation early. Café, naïve, 東京, 你好, and emoji 🙂🚀 are
unicode text that byte-level tokenizers split into several tokens.
"""


def build_tiny_gpt2(path: Path, vocab_size: int = 512, n_positions: int = 256) -> Path:
    """Write a tiny GPT-2 (model + tokenizer, Hugging Face format) to `path` and return it."""
    path.mkdir(parents=True, exist_ok=True)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        [CORPUS] * 20,
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=["<|endoftext|>"],
    )
    model = json.loads(bpe._tokenizer.model.__getstate__())
    tokenizer = GPT2TokenizerFast(
        vocab=model["vocab"],
        merges=[tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]],
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        model_max_length=n_positions,
    )
    tokenizer.save_pretrained(path)
    eos = tokenizer.eos_token_id
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=n_positions,
        n_embd=64,
        n_layer=2,
        n_head=4,
        bos_token_id=eos,
        eos_token_id=eos,
    )
    torch.manual_seed(1234)
    GPT2LMHeadModel(config).save_pretrained(path)
    return path

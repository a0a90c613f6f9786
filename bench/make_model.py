"""Write a random-weight GPT-2 with the real GPT2Config() (124M): exactly GPT-2's cost, no download.

The tokenizer is GPT-2's real one when `../shared/data/ggml-vocab-gpt-2.gguf` (or --vocab) is present:
its 50257 tokens and 50000 merges are read from the vocabulary-only GGUF. Otherwise a byte-level BPE is
trained on a small corpus; the model keeps GPT-2's 50257-token output layer either way, so the cost is
the same.

    python bench/make_model.py /tmp/textgen-bench/gpt2-random
    python bench/make_model.py /tmp/textgen-bench/gpt2-random-6-layers --layers 6 --seed 1   # distilgpt2's shape
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

DEFAULT_VOCAB = Path(__file__).resolve().parents[2] / "shared" / "data" / "ggml-vocab-gpt-2.gguf"


def gpt2_tokenizer(vocab_file: Path) -> GPT2TokenizerFast:
    from gguf import GGUFReader

    reader = GGUFReader(str(vocab_file))

    def strings(key: str) -> list[str]:
        field = reader.fields[key]
        return [bytes(field.parts[i]).decode("utf-8") for i in field.data]

    tokens = strings("tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ")) for m in strings("tokenizer.ggml.merges")]
    return GPT2TokenizerFast(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, model_max_length=1024)


def trained_tokenizer() -> GPT2TokenizerFast:
    import json

    from tokenizers import ByteLevelBPETokenizer

    text = " ".join(f"word{i} the of and to in is was for on that with as by at" for i in range(3000))
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([text], vocab_size=5000, special_tokens=["<|endoftext|>"])
    state = json.loads(bpe._tokenizer.model.__getstate__())
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in state["merges"]]
    return GPT2TokenizerFast(vocab=state["vocab"], merges=merges, model_max_length=1024)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out", type=Path)
    parser.add_argument("--vocab", type=Path, default=DEFAULT_VOCAB)
    parser.add_argument("--layers", type=int, default=12, help="6: distilgpt2's shape (a draft model)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if (args.out / "config.json").is_file():
        print(f"{args.out} exists")
        return
    real = args.vocab.is_file()
    tokenizer = gpt2_tokenizer(args.vocab) if real else trained_tokenizer()
    tokenizer.eos_token = tokenizer.bos_token = tokenizer.unk_token = "<|endoftext|>"
    torch.manual_seed(args.seed)
    model = GPT2LMHeadModel(GPT2Config(n_layer=args.layers))  # 12 layers: 124M, vocab 50257, context 1024
    model.config.eos_token_id = model.config.bos_token_id = tokenizer.eos_token_id
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    print(f"wrote {args.out} ({'GPT-2 vocabulary' if real else 'trained stand-in tokenizer'})")


if __name__ == "__main__":
    main()

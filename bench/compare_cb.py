"""textgen's decode loop against transformers' own continuous-batching manager (`generate_batch`).

Both in-process (no HTTP), same model and dtype, workload W: 32-token prompt, 128 new tokens, EOS ignored,
greedy and top-p (0.7 / 0.9); 1 and 32 requests submitted at once. Everything runs in one worker thread,
as in the server.

    python bench/compare_cb.py --dtype bfloat16     # writes bench/results/continuous-batching.md
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.run import MODEL_DIR, NEW_TOKENS, PROMPT_TOKENS  # noqa: E402
from textgen.config import Settings  # noqa: E402
from textgen.engine.core import Engine  # noqa: E402
from textgen.model.loading import load_model  # noqa: E402
from textgen.model.source import resolve_model  # noqa: E402
from textgen.engine.params import SamplingParams  # noqa: E402

MODES = {"greedy": {"temperature": 0.0}, "top-p": {"temperature": 0.7, "top_p": 0.9}}


def measure(dtype: str) -> list[tuple[str, str, int, float]]:
    from transformers import GenerationConfig

    settings = Settings(model_name=str(MODEL_DIR), threads=2, dtype=dtype)
    loaded = load_model(settings, resolve_model(settings))
    prompt = loaded.tokenizer.encode(
        "The history of computing is a story of people, ideas and machines. " * 8
    )
    prompt = prompt[:PROMPT_TOKENS]
    rows = []
    engine = Engine(loaded.model, loaded.tokenizer, context_length=loaded.context_length, max_batch_size=64)
    engine.start()
    for mode, sampling in MODES.items():
        params = SamplingParams(
            max_new_tokens=NEW_TOKENS,
            ignore_eos=True,
            repetition_penalty=1.0,
            no_repeat_ngram_size=0,
            **sampling,
        )
        engine.submit(prompt, SamplingParams(max_new_tokens=4, ignore_eos=True)).wait()
        for n in (1, 32):
            start = time.perf_counter()
            results = [h.wait() for h in [engine.submit(prompt, params) for _ in range(n)]]
            rows.append(
                (
                    "textgen engine",
                    mode,
                    n,
                    sum(r.completion_tokens for r in results) / (time.perf_counter() - start),
                )
            )
    engine.stop()

    for mode, sampling in MODES.items():
        sample = sampling["temperature"] > 0
        mode_kwargs = dict(
            do_sample=sample, temperature=sampling["temperature"] or None, top_p=sampling.get("top_p")
        )
        config = GenerationConfig(
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            eos_token_id=-1,
            pad_token_id=0,
            top_k=0,
            **mode_kwargs,
        )
        loaded.model.generate_batch(inputs=[prompt] * 2, generation_config=config)  # warm-up
        for n in (1, 32):
            start = time.perf_counter()
            out = loaded.model.generate_batch(inputs=[prompt] * n, generation_config=config)
            tokens = sum(len(r.generated_tokens) for r in out.values())
            rows.append(("transformers generate_batch", mode, n, tokens / (time.perf_counter() - start)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    torch.set_num_threads(2)
    box: dict[str, list] = {}
    worker = threading.Thread(target=lambda: box.setdefault("rows", measure(args.dtype)))
    worker.start()
    worker.join()
    lines = [
        f"In-process decode loops, random-weight GPT-2 124M, {args.dtype}, 2 threads, workload W (tok/s):",
        "",
        "| loop | decoding | requests at once | tok/s |",
        "| --- | --- | ---: | ---: |",
        *[f"| {loop} | {mode} | {n} | {rate:.1f} |" for loop, mode, n, rate in box["rows"]],
    ]
    out = ROOT / "bench" / "results" / "continuous-batching.md"
    out.write_text("\n".join(lines) + "\n")
    print(out.read_text())


if __name__ == "__main__":
    main()

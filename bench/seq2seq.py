"""Seq2seq throughput and streaming: the batched Seq2SeqRunner against the one-at-a-time `generate` runner.

A random-weight T5 the size of google/flan-t5-small (T5Config as in its config.json: 77M parameters, the
same cost; no download) runs in-process behind the Engine, once with each runner, at 1 and 8 concurrent
clients in a closed loop. Each request: a 32-token prompt, 128 new tokens with EOS ignored, greedy with
penalties off (as workload W in run.py). Reported per level: aggregate tokens/s (all clients' tokens over
the wall time), time to the first streamed text (TTFT, from submission), when that first text came as a
share of the request's whole time, and whether every request's first text arrived before half of its
tokens could have been generated (it streamed; the generate runner hands all tokens over at the end).

The tokenizer is a word-level vocabulary of flan-t5-small's 32128 ids ("w0", "w1", ...) without special
tokens: every id the random model picks (mostly 0) decodes to text, and the detokenizing cost per token is
of the same order as SentencePiece's.

    flock /tmp/textgen-cpu.lock python bench/seq2seq.py    # bench/results/<date>-seq2seq.{md,json}

Nothing else should run meanwhile (the numbers are CPU-bound).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit
from transformers import PreTrainedTokenizerFast, T5Config, T5ForConditionalGeneration

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.anchors import cpu_info, cpu_line  # noqa: E402
from bench.seq2seq_baseline import GenerateRunner  # noqa: E402
from textgen.engine.core import Engine  # noqa: E402
from textgen.engine.params import SamplingParams  # noqa: E402

PROMPT_TOKENS, NEW_TOKENS = 32, 128
# google/flan-t5-small's config.json, the sizes that set the cost.
FLAN_T5_SMALL = dict(
    vocab_size=32128,
    d_model=512,
    d_ff=1024,
    d_kv=64,
    num_layers=8,
    num_decoder_layers=8,
    num_heads=6,
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
    feed_forward_proj="gated-gelu",
    tie_word_embeddings=False,
    pad_token_id=0,
    eos_token_id=1,
    decoder_start_token_id=0,
)
PARAMS = SamplingParams(
    max_new_tokens=NEW_TOKENS, temperature=0, ignore_eos=True, repetition_penalty=1.0, no_repeat_ngram_size=0
)


@dataclass
class Level:
    runner: str
    clients: int
    requests: int
    errors: int
    tokens: int
    seconds: float
    tokens_per_second: float
    ttft_p50_ms: float
    ttft_max_ms: float
    latency_p50_s: float
    first_text_at_pct: (
        float  # p50 over requests of TTFT / latency: when the first text came, in % of the request
    )
    streamed: bool  # every request's first text arrived before half of its tokens could have been generated


def word_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    words = Tokenizer(WordLevel({f"w{i}": i for i in range(vocab_size)}, unk_token="w2"))
    words.pre_tokenizer = WhitespaceSplit()
    # No special tokens: the random model mostly picks id 0 (T5's pad), which must still decode to text
    # for the stream to carry it (EOS is ignored anyway).
    return PreTrainedTokenizerFast(tokenizer_object=words, model_max_length=512)


def t5_model(dtype: torch.dtype) -> T5ForConditionalGeneration:
    torch.manual_seed(0)
    return T5ForConditionalGeneration(T5Config(**FLAN_T5_SMALL)).to(dtype).eval()


def prompts(n: int) -> list[list[int]]:
    rng = torch.Generator().manual_seed(1)
    return [torch.randint(3, 32000, (PROMPT_TOKENS,), generator=rng).tolist() for _ in range(n)]


def run_level(engine: Engine, name: str, clients: int, per_client: int) -> Level:
    ttft: list[float] = []
    latency: list[float] = []
    tokens = errors = 0
    lock = threading.Lock()
    work = prompts(clients * per_client)

    def client(index: int) -> None:
        nonlocal tokens, errors
        for ids in work[index::clients]:
            start = time.perf_counter()
            handle = engine.submit(ids, PARAMS)
            first = handle._events.get(timeout=600)  # the first event: a text delta, or the end
            first_at = time.perf_counter()
            result = first.result
            while result is None:
                result = handle._events.get(timeout=600).result
            with lock:
                ttft.append(first_at - start)
                latency.append(time.perf_counter() - start)
                tokens += result.completion_tokens
                errors += result.finish_reason != "length"

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    began = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - began
    return Level(
        runner=name,
        clients=clients,
        requests=len(work),
        errors=errors,
        tokens=tokens,
        seconds=round(seconds, 2),
        tokens_per_second=round(tokens / seconds, 1),
        ttft_p50_ms=round(statistics.median(ttft) * 1000, 1),
        ttft_max_ms=round(max(ttft) * 1000, 1),
        latency_p50_s=round(statistics.median(latency), 2),
        # The generate runner hands every token over after the last one (a first event at ~100% of the
        # request's time); a streamed request's first text comes after its first step (~1/128 of it).
        first_text_at_pct=round(statistics.median(f / t for f, t in zip(ttft, latency)) * 100, 1),
        streamed=all(f < t / 2 for f, t in zip(ttft, latency)),
    )


def engine_for(model: Any, tokenizer: Any, runner: str) -> Engine:
    engine = Engine(model, tokenizer, context_length=512, max_batch_size=32)
    if runner == "generate (before)":
        engine.runner = GenerateRunner(model)
    return engine.start()


def markdown(levels: list[Level], cpu: dict[str, Any], dtype: str, threads: int, date: str) -> str:
    lines = [
        f"# Seq2seq: batched runner vs one-at-a-time generate, {date}",
        "",
        f"CPU: {cpu_line(cpu)}, {threads} threads, torch {torch.__version__}.",
        f"Model: random-weight T5 with google/flan-t5-small's sizes (77M parameters), {dtype}. "
        f"Workload: {PROMPT_TOKENS}-token prompts, {NEW_TOKENS} new tokens (EOS ignored), greedy, penalties off, "
        "closed-loop clients in-process through the Engine (bench/seq2seq.py).",
        "",
        "| runner | clients | requests | tok/s | TTFT p50 ms | TTFT max ms | latency p50 s | first text at "
        "(% of request) | streamed | errors |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |",
    ]
    for lv in levels:
        lines.append(
            f"| {lv.runner} | {lv.clients} | {lv.requests} | {lv.tokens_per_second} | {lv.ttft_p50_ms} | "
            f"{lv.ttft_max_ms} | {lv.latency_p50_s} | {lv.first_text_at_pct} | {'yes' if lv.streamed else 'no'} | "
            f"{lv.errors} |"
        )
    by = {(lv.runner, lv.clients): lv.tokens_per_second for lv in levels}
    lines.append("")
    for clients in sorted({lv.clients for lv in levels}):
        before, after = by.get(("generate (before)", clients)), by.get(("batched", clients))
        if before and after:
            lines.append(
                f"- {clients} client(s): batched is {after / before:.2f}x the generate runner's tok/s."
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--per-client", type=int, default=3, help="requests per client at 8 clients")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    model, tokenizer = t5_model(dtype), word_tokenizer(FLAN_T5_SMALL["vocab_size"])
    levels = []
    for runner in ("generate (before)", "batched"):
        engine = engine_for(model, tokenizer, runner)
        try:
            run_level(engine, runner, 1, 1)  # warm-up: first-call allocations and kernel choices
            for clients, per_client in ((1, args.per_client), (8, args.per_client)):
                level = run_level(engine, runner, clients, per_client)
                print(json.dumps(asdict(level)), flush=True)
                levels.append(level)
        finally:
            engine.stop()
    date = dt.date.today().isoformat()
    cpu = cpu_info()
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"{date}-seq2seq{'' if args.dtype == 'float32' else '-' + args.dtype}"
    report = markdown(levels, cpu, args.dtype, args.threads, date)
    stem.with_suffix(".md").write_text(report)
    stem.with_suffix(".json").write_text(
        json.dumps({"cpu": cpu, "dtype": args.dtype, "levels": [asdict(lv) for lv in levels]}, indent=2)
    )
    print(report)


if __name__ == "__main__":
    main()

"""Chunked prefill and automatic prefix caching against today's engine, in the same run (issue #15 targets).

Three engines, each measured in a subprocess of its own (a fresh process, the same model and settings):

- baseline: textgen as it was before chunked prefill (`--baseline-rev`, exported with `git archive`): an
  engine iteration is a prefill or a decoding step, a prompt is computed whole, nothing is cached.
- unchunked: this tree with TEXTGEN_MAX_STEP_TOKENS=0 (no chunking) and the prefix cache off.
- chunked: this tree with its defaults (a long prompt's chunks share the decoding steps' passes, sized from
  what they add to a step, cap 512; 256 MB cache).

Workloads (random-weight GPT-2 124M, the real GPT-2 vocabulary: every forward pass costs what GPT-2's does):

- arrival: 16 greedy streams decoding (32-token prompts), then a 1000-token prompt arrives; three times,
  the gaps pooled. The streams' inter-token latency (ITL) before the arrival ("normal") and while the long
  prompt is being computed, and the long prompt's time to first token (median). Target: ITL p99 during the
  arrival <= 2x the normal ITL.
- W: 32 clients in a closed loop, 3 requests each, 32-token prompts, 128 new tokens, sampled (temperature
  0.7, top-p 0.9, penalties off), EOS ignored; client i starts 20 ms after client i-1. Tokens/s, best of 3.
  Target: chunked within 5% of the baseline.
- prefix: a 600-token shared prefix + a 20-token suffix, one new token: time to first token of the first
  request with a prefix (a miss) and of later ones with other suffixes (hits); median over 3 prefixes.
  Target: hit >= 5x faster than a miss.
- few_shot: the `few_shot` template around 4 questions, one new token: the first (miss) and the others.

    flock /tmp/textgen-cpu.lock python bench/prefill.py     # bench/results/<date>-prefill.{md,json}
"""

from __future__ import annotations

import argparse
import datetime
import json
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# The last commit before chunked prefill and prefix caching: "today's engine" of issue #15.
BASELINE_REV = "58a57dd"
MODEL_DIR = Path("/tmp/textgen-bench/gpt2-random")  # bench/make_model.py (as bench/run.py)
STREAMS, STREAM_PROMPT, LONG_PROMPT = 16, 32, 1000
W_CLIENTS, W_ROUNDS, W_PROMPT, W_NEW = 32, 3, 32, 128
W_RUNS = 3  # best of: one run varies by +-10% on a 2-core VM
PREFIX, SUFFIX, PREFIXES, HITS = 600, 20, 3, 3
ARRIVALS = 3  # long prompts arriving, one after another, each to its own 16 fresh streams


class StepClock:
    """Engine observer: the time of every iteration and how many tokens the watched stream had then."""

    def __init__(self) -> None:
        self.watched: Any = None
        self.samples: list[tuple[float, int]] = []

    def on_step(self, *args: Any) -> None:
        if self.watched is not None:
            self.samples.append((time.perf_counter(), len(self.watched.sequence.output_ids)))

    def on_finish(self, result: Any) -> None:
        pass

    def on_failure(self, kind: str) -> None:
        pass

    def on_memory(self, *args: Any) -> None:
        pass

    def on_prefix_cache(self, stats: Any) -> None:
        pass

    def on_speculation(self, drafted: int, accepted: int) -> None:
        pass

    def token_times(self) -> list[float]:
        """When the watched stream got each of its tokens (the iteration that gave it one)."""
        times, seen = [], 0
        for at, count in self.samples:
            if count > seen:
                times += [at] * (count - seen)
                seen = count
        return times


def wait_for(condition: Any, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("the benchmark waited too long")
        time.sleep(0.002)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def random_prompt(rng: random.Random, n: int, vocab: int) -> list[int]:
    return [rng.randrange(vocab - 1) for _ in range(n)]  # never the last id: GPT-2's end of text


def arrival(engine: Any, clock: StepClock, params: Any, vocab: int, seed: int) -> dict[str, Any]:
    """One arrival: the watched stream's gaps before it ("normal") and while the long prompt is computed."""
    rng = random.Random(seed)  # new prompts each time: a long prompt seen before would be a prefix-cache hit
    stream = params(max_new_tokens=700, temperature=0, ignore_eos=True)
    handles = engine.submit_many([(random_prompt(rng, STREAM_PROMPT, vocab), stream) for _ in range(STREAMS)])
    clock.watched = handles[0]
    wait_for(lambda: len(handles[0].sequence.output_ids) >= 40)
    submitted = time.perf_counter()
    long = engine.submit(random_prompt(rng, LONG_PROMPT, vocab), params(max_new_tokens=4, temperature=0))
    wait_for(lambda: len(long.sequence.output_ids) >= 1)
    first_token = time.perf_counter()
    mark = len(handles[0].sequence.output_ids)
    wait_for(lambda: len(handles[0].sequence.output_ids) >= mark + 20)
    for h in handles:
        h.cancel()
    for h in handles + [long]:
        h.wait(600)
    clock.watched = None
    times = clock.token_times()
    clock.samples.clear()
    gaps = [(b - a, b) for a, b in zip(times, times[1:])]
    return {
        "normal": [g for g, at in gaps[10:] if at < submitted],  # after the streams have all joined
        "during": [g for g, at in gaps if at > submitted and at - g < first_token],  # overlaps the arrival
        "long_ttft": first_token - submitted,
    }


def arrivals(engine: Any, clock: StepClock, params: Any, vocab: int) -> dict[str, Any]:
    """ARRIVALS arrivals, their gaps pooled: one arrival gives ~50 gaps during it, whose p99 is their
    largest, one step's worth of host noise (+-10 ms on a 2-core VM); 150 gaps give a p99 that is one."""
    runs = [arrival(engine, clock, params, vocab, seed=1 + i) for i in range(ARRIVALS)]
    normal = [g for r in runs for g in r["normal"]]
    during = [g for r in runs for g in r["during"]]
    return {
        "normal_itl_ms_p50": 1000 * statistics.median(normal),
        "normal_itl_ms_p99": 1000 * percentile(normal, 0.99),
        "arrival_itl_ms_p99": 1000 * percentile(during, 0.99),
        "arrival_itl_ms_max": 1000 * max(during),
        "arrival_steps": len(during),
        "long_ttft_ms": 1000 * statistics.median(r["long_ttft"] for r in runs),
        "ratio_p99_to_normal": percentile(during, 0.99) / statistics.median(normal),
        # Each arrival alone: its largest gap over its normal median (what one arrival's p99 is).
        "ratios_per_arrival": [max(r["during"]) / statistics.median(r["normal"]) for r in runs],
        "arrival_gaps_ms": [round(1000 * g, 1) for g in during],
    }


def workload_w(engine: Any, params: Any, vocab: int) -> float:
    sampled = params(
        max_new_tokens=W_NEW,
        temperature=0.7,
        top_p=0.9,
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        ignore_eos=True,
    )
    tokens = [0] * W_CLIENTS

    def client(i: int) -> None:
        rng = random.Random(100 + i)
        time.sleep(0.02 * i)
        for _ in range(W_ROUNDS):
            tokens[i] += (
                engine.submit(random_prompt(rng, W_PROMPT, vocab), sampled).wait(600).completion_tokens
            )

    threads = [threading.Thread(target=client, args=(i,)) for i in range(W_CLIENTS)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(tokens) / (time.perf_counter() - start)


def ttft_ms(engine: Any, prompt: list[int], params: Any) -> float:
    start = time.perf_counter()
    engine.submit(prompt, params(max_new_tokens=1, temperature=0)).wait(600)
    return 1000 * (time.perf_counter() - start)


def prefix_hits(engine: Any, params: Any, vocab: int) -> dict[str, float]:
    rng = random.Random(7)
    misses, hits = [], []
    for _ in range(PREFIXES):
        prefix = random_prompt(rng, PREFIX, vocab)
        misses.append(ttft_ms(engine, prefix + random_prompt(rng, SUFFIX, vocab), params))
        hits += [ttft_ms(engine, prefix + random_prompt(rng, SUFFIX, vocab), params) for _ in range(HITS)]
    return {"miss_ms": statistics.median(misses), "hit_ms": statistics.median(hits)}


def few_shot(engine: Any, tokenizer: Any, params: Any) -> dict[str, float]:
    from textgen.frontend.templates import render

    questions = ["What is AI?", "Who wrote Hamlet?", "What is the capital of Italy?", "How far is the Moon?"]
    prompts = [tokenizer.encode(render("few_shot", q, tokenizer).text) for q in questions]
    times = [ttft_ms(engine, p, params) for p in prompts]
    return {"prompt_tokens": len(prompts[0]), "miss_ms": times[0], "hit_ms": statistics.median(times[1:])}


def worker(config: str, dtype: str, threads: int) -> dict[str, Any]:
    """One engine's measurements; runs in the process whose sys.path holds that engine's textgen."""
    import torch

    from textgen.config import Settings
    from textgen.engine.core import Engine
    from textgen.engine.params import SamplingParams
    from textgen.model.loading import load_model

    try:
        from textgen.model.source import resolve_model
    except ImportError:  # a baseline tree from before resolving moved out of textgen/model/loading.py
        from textgen.model.loading import resolve_model  # type: ignore[no-redef]

    torch.set_num_threads(threads)
    settings = Settings(model_name=str(MODEL_DIR), threads=threads, dtype=dtype)
    loaded = load_model(settings, resolve_model(settings))
    extra: dict[str, Any] = {}
    if config == "unchunked":
        extra = {"max_step_tokens": 0, "prefix_cache_bytes": 0, "speculative": "off"}
    elif config == "chunked":
        extra = {
            "max_step_tokens": settings.max_step_tokens,
            "prefix_cache_bytes": settings.prefix_cache_mb << 20,
            "model_key": "bench",
            "speculative": "off",
        }
    clock = StepClock()
    engine = Engine(
        loaded.model,
        loaded.tokenizer,
        context_length=loaded.context_length,
        max_batch_size=32,
        observer=clock,
        **extra,
    ).start()
    vocab = int(loaded.model.config.vocab_size)
    params = SamplingParams
    try:
        ttft_ms(engine, random_prompt(random.Random(0), 64, vocab), params)  # warm-up
        return {
            "config": config,
            "dtype": str(loaded.dtype),
            "arrival": arrivals(engine, clock, params, vocab),
            "w_tok_s": [workload_w(engine, params, vocab) for _ in range(W_RUNS)],
            "prefix": prefix_hits(engine, params, vocab),
            "few_shot": few_shot(engine, loaded.tokenizer, params),
        }
    finally:
        engine.stop()


def run_config(config: str, tree: Path, dtype: str, threads: int) -> dict[str, Any]:
    from bench.trees import run_worker

    args = ["--worker", config, "--tree", str(tree), "--dtype", dtype, "--threads", str(threads)]
    return run_worker(Path(__file__).resolve(), tree, args, threads)


def markdown(meta: dict[str, Any], results: list[dict[str, Any]]) -> str:
    from bench.anchors import cpu_line

    cpu = meta["cpu"]
    base = next(r for r in results if r["config"] == "baseline")
    # `auto` may resolve differently in the baseline's tree: compare at an explicit dtype then.
    served = ", ".join(f"{r['config']} {r['dtype']}" for r in results)
    allocators = ", ".join(sorted({r.get("allocator", "not recorded") for r in results}))
    lines = [
        f"# Chunked prefill and prefix caching, {meta['date']}",
        "",
        f"CPU: {cpu_line(cpu)}, {meta['threads']} threads, torch {meta['torch']}, "
        f"TEXTGEN_DTYPE={meta['dtype']} (served as {served}), allocator {allocators} (TEXTGEN_ALLOCATOR). "
        "Random-weight GPT-2 124M, real vocabulary, "
        f"in-process Engine. baseline = textgen {meta['baseline_rev']} (before chunked prefill), in the same "
        "run. Workloads: bench/prefill.py.",
        "",
        f"## {STREAMS} streams decoding, a {LONG_PROMPT}-token prompt arrives",
        "",
        "| engine | normal ITL p50 | normal ITL p99 | ITL p99 during arrival | max | during / normal p50 "
        "| each arrival: max / its p50 | steps during | long prompt TTFT |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        a = r["arrival"]
        lines.append(
            f"| {r['config']} | {a['normal_itl_ms_p50']:.0f} ms | {a['normal_itl_ms_p99']:.0f} ms | "
            f"{a['arrival_itl_ms_p99']:.0f} ms | {a['arrival_itl_ms_max']:.0f} ms | "
            f"{a['ratio_p99_to_normal']:.2f}x | "
            + " / ".join(f"{x:.2f}x" for x in a.get("ratios_per_arrival", []))
            + f" | {a['arrival_steps']} | {a['long_ttft_ms']:.0f} ms |"
        )
    lines += [
        "",
        f"## Workload W: {W_CLIENTS} clients, closed loop, {W_PROMPT}-token prompts, {W_NEW} new tokens",
        "",
        f"| engine | tok/s ({W_RUNS} runs) | best vs baseline |",
        "| --- | ---: | ---: |",
    ]
    best_base = max(base["w_tok_s"])
    for r in results:
        runs = " / ".join(f"{x:.0f}" for x in r["w_tok_s"])
        lines.append(f"| {r['config']} | {runs} | {max(r['w_tok_s']) / best_base:.3f}x |")
    lines += [
        "",
        f"## Time to first token: {PREFIX}-token shared prefix + {SUFFIX}-token suffix; `few_shot` template",
        "",
        "| engine | prefix miss | prefix hit | miss / hit | few_shot first | few_shot later | first / later |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        p, f = r["prefix"], r["few_shot"]
        lines.append(
            f"| {r['config']} | {p['miss_ms']:.0f} ms | {p['hit_ms']:.0f} ms | {p['miss_ms'] / p['hit_ms']:.1f}x | "
            f"{f['miss_ms']:.0f} ms | {f['hit_ms']:.0f} ms | {f['miss_ms'] / f['hit_ms']:.1f}x |"
        )
    few = results[0]["few_shot"]["prompt_tokens"]
    lines += ["", f"The few_shot prompt is {few} tokens, most of them the template's own examples."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--baseline-rev", default=BASELINE_REV)
    parser.add_argument("--configs", default="baseline,unchunked,chunked")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results", help="where the results go")
    parser.add_argument("--name", default="prefill", help="results file name after the date")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--tree", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.dtype, args.threads)))
        return

    import torch

    sys.path.insert(0, str(ROOT))
    from bench.anchors import cpu_info
    from bench.trees import export
    from bench.run import ensure_model

    ensure_model()
    results = []
    with tempfile.TemporaryDirectory() as baseline_tree:
        export(args.baseline_rev, Path(baseline_tree))
        for config in args.configs.split(","):
            tree = Path(baseline_tree) if config == "baseline" else ROOT
            print(f"{config} ...", file=sys.stderr, flush=True)
            results.append(run_config(config, tree, args.dtype, args.threads))
    date = datetime.date.today().isoformat()
    meta = {
        "date": date,
        "cpu": cpu_info(),
        "threads": args.threads,
        "dtype": args.dtype,
        "torch": torch.__version__,
        "baseline_rev": args.baseline_rev,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"{date}-{args.name}"
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(meta, results))
    print(markdown(meta, results))


if __name__ == "__main__":
    main()

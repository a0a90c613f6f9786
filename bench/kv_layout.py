"""The KV layout: one left-padded cache for the whole batch (before) against segments (textgen/engine/batch.py).

Issue #15 asks for the new layout to be measured against today's left-padded cache at batch 1, 8 and 32
before it replaces it. Both run here, each in a fresh subprocess, on the same model and CPU:

- left-padded: textgen at `--baseline-rev` (exported with `git archive`), one padded cache for all rows;
- segmented: this tree.

Measured with the engine's own batch object (no HTTP, no scheduler), random-weight GPT-2 124M:

- uniform: B rows (1, 8, 32) with 32-token prompts prefilled together, then 96 decoding steps; the median
  step time over the last 64 (the layouts should not differ: one segment is one left-padded cache);
- arrival: 16 rows decoding (32-token prompts, 32 steps in), then a 1000-token prompt's row joins: the time
  of the join and the median of the next 16 steps.

    flock /tmp/textgen-cpu.lock python bench/kv_layout.py    # bench/results/<date>-kv-layout.{md,json}
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BASELINE_REV = "6b062ad"  # the last commit with one left-padded cache for the whole batch
MODEL_DIR = Path("/tmp/textgen-bench/gpt2-random")  # bench/make_model.py
BATCHES, PROMPT, STEPS, TIMED = (1, 8, 32), 32, 96, 64
STREAMS, LONG_PROMPT, WARM_STEPS, AFTER_STEPS = 16, 1000, 32, 16


def worker(dtype: str, threads: int) -> dict[str, Any]:
    """Runs in the process whose sys.path holds the textgen being measured."""
    import torch

    from textgen.config import Settings
    from textgen.engine.batch import DecodeBatch
    from textgen.model.attention import use_decode_attention
    from textgen.model.loading import load_model

    try:
        from textgen.model.source import resolve_model
    except ImportError:  # a baseline tree from before resolving moved out of textgen/model/loading.py
        from textgen.model.loading import resolve_model  # type: ignore[no-redef]

    torch.set_num_threads(threads)
    settings = Settings(model_name=str(MODEL_DIR), threads=threads, dtype=dtype)
    loaded = load_model(settings, resolve_model(settings))
    model, vocab = loaded.model, int(loaded.model.config.vocab_size)
    use_decode_attention(model)  # as the engine does
    rng = random.Random(0)
    segmented = "segmented" in inspect.signature(DecodeBatch.concatenate).parameters

    def prompts(n: int, length: int) -> list[list[int]]:
        return [[rng.randrange(vocab) for _ in range(length)] for _ in range(n)]

    def started(n: int, length: int) -> DecodeBatch:
        batch, logits = DecodeBatch.prefill(model, list(range(n)), prompts(n, length), vocab)
        batch.record(logits.argmax(-1))
        return batch

    def steps(batch: DecodeBatch, n: int) -> list[float]:
        times = []
        for _ in range(n):
            t = time.perf_counter()
            logits = batch.step(model)
            batch.record(logits.argmax(-1))
            times.append(time.perf_counter() - t)
        return times

    with torch.inference_mode():
        steps(started(4, PROMPT), 8)  # warm-up
        uniform = {}
        for rows in BATCHES:
            uniform[rows] = 1000 * statistics.median(steps(started(rows, PROMPT), STEPS)[-TIMED:])
        batch = started(STREAMS, PROMPT)
        before = 1000 * statistics.median(steps(batch, WARM_STEPS)[-16:])
        long_row = started(1, LONG_PROMPT)
        t = time.perf_counter()
        if segmented:
            batch.concatenate(long_row, segmented=True)
        else:
            batch.concatenate(long_row)
        join = 1000 * (time.perf_counter() - t)
        after = steps(batch, AFTER_STEPS)
    return {
        "dtype": str(loaded.dtype),
        "uniform_step_ms": uniform,
        "arrival": {
            "step_before_ms": before,
            "join_ms": join,
            "first_step_after_ms": 1000 * after[0],
            "step_after_ms": 1000 * statistics.median(after),
        },
    }


def run(tree: Path, dtype: str, threads: int) -> dict[str, Any]:
    from bench.trees import run_worker

    args = ["--worker", "--dtype", dtype, "--threads", str(threads)]
    return run_worker(Path(__file__).resolve(), tree, args, threads)


def markdown(meta: dict[str, Any], results: dict[str, dict[str, Any]]) -> str:
    from bench.anchors import cpu_line

    base, new = results["left-padded"], results["segmented"]
    lines = [
        f"# KV layout: one left-padded cache against segments, {meta['date']}",
        "",
        f"CPU: {cpu_line(meta['cpu'])}, {meta['threads']} threads, torch {meta['torch']}, TEXTGEN_DTYPE={meta['dtype']} "
        f"(served as {new['dtype']}). Random-weight GPT-2 124M; the engine's batch object, no HTTP. "
        f"left-padded = textgen {meta['baseline']}, segmented = this tree, each in a fresh process. bench/kv_layout.py.",
        "",
        f"## Decoding step, rows of the same length ({PROMPT}-token prompts, median of steps "
        f"{STEPS - TIMED + 1}-{STEPS})",
        "",
        "| rows | left-padded | segmented | segmented / left-padded |",
        "| ---: | ---: | ---: | ---: |",
    ]
    for rows in base["uniform_step_ms"]:
        a, b = base["uniform_step_ms"][rows], new["uniform_step_ms"][rows]
        lines.append(f"| {rows} | {a:.1f} ms | {b:.1f} ms | {b / a:.2f}x |")
    lines += [
        "",
        f"## {STREAMS} rows decoding, a {LONG_PROMPT}-token prompt's row joins",
        "",
        "| layout | step before | join | first step after | step after (median of "
        f"{AFTER_STEPS}) | after / before |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, result in results.items():
        a = result["arrival"]
        lines.append(
            f"| {name} | {a['step_before_ms']:.1f} ms | {a['join_ms']:.1f} ms | "
            f"{a['first_step_after_ms']:.1f} ms | {a['step_after_ms']:.1f} ms | "
            f"{a['step_after_ms'] / a['step_before_ms']:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--baseline-rev", default=BASELINE_REV)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.dtype, args.threads)))
        return
    sys.path.insert(0, str(ROOT))
    from bench.anchors import cpu_info

    from bench.trees import export

    with tempfile.TemporaryDirectory() as tmp:
        baseline = export(args.baseline_rev, Path(tmp))
        results = {
            "left-padded": run(baseline, args.dtype, args.threads),
            "segmented": run(ROOT, args.dtype, args.threads),
        }
    import torch

    meta = {
        "date": datetime.date.today().isoformat(),
        "cpu": cpu_info(),
        "threads": args.threads,
        "torch": torch.__version__,
        "dtype": args.dtype,
        "baseline": args.baseline_rev,
    }
    out = ROOT / "bench" / "results" / f"{meta['date']}-kv-layout"
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    out.with_suffix(".md").write_text(markdown(meta, results))
    print(markdown(meta, results))


if __name__ == "__main__":
    main()

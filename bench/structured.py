"""What structured output costs per decoding step: the same batch free, and with every row constrained.

In-process (no HTTP), on a random-weight GPT-2 124M with GPT-2's real vocabulary (bench/make_model.py),
loaded as the server loads it (TEXTGEN_DTYPE as given, default auto). Each row generates 64 tokens; the
constrained rows follow a JSON schema whose one long string field keeps them inside the grammar for all 64
(the mask of a JSON string allows most of the vocabulary: the dearest state to compute), and the median step
time is compared at 1, 8 and 32 rows; so is a forced tool call (tool_choice "required": a Lark grammar of
Hermes calls with the same schema as the tool's parameters, textgen/frontend/tools.py), and what compiling
each request's grammar costs.

    python bench/structured.py            # writes bench/results/structured.md
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from bench.run import MODEL_DIR, ensure_model  # the random GPT-2 every benchmark shares
from textgen.config import Settings
from textgen.engine.core import Engine
from textgen.engine.params import Constraint, SamplingParams
from textgen.frontend.tools import FunctionDefinition, Tool, ToolUse
from textgen.model.cpu import describe
from textgen.model.loading import load_model
from textgen.model.source import resolve_model

SCHEMA = {
    "type": "object",
    "properties": {"story": {"type": "string", "minLength": 2000}},
    "required": ["story"],
}
PROMPT = "Write a long story about a lighthouse keeper and the sea."
TOKENS = 64


class StepTimes:
    def __init__(self) -> None:
        self.seconds: list[tuple[int, float]] = []

    def on_step(self, batch_size: int, tokens: int, seconds: float, running: int, waiting: int) -> None:
        self.seconds.append((batch_size, seconds))

    def on_finish(self, result: object) -> None:
        pass

    def on_failure(self, kind: str) -> None:
        pass

    def on_memory(self, reserved_tokens: int, budget_tokens: int | None, cache_bytes: int) -> None:
        pass

    def on_prefix_cache(self, stats: object) -> None:
        pass


JSON_CONSTRAINT = Constraint("json_schema", json.dumps(SCHEMA))
TOOL_CONSTRAINT = ToolUse(
    "required", (Tool(type="function", function=FunctionDefinition(name="write_story", parameters=SCHEMA)),)
).constraint()


def median_step_ms(
    engine: Engine, times: StepTimes, ids: list[int], rows: int, constraint: Constraint | None
) -> float:
    params = [
        SamplingParams(
            max_new_tokens=TOKENS, temperature=1.0, top_p=1.0, seed=i, ignore_eos=True, constraint=constraint
        )
        for i in range(rows)
    ]
    times.seconds.clear()
    handles = engine.submit_many([(ids, p) for p in params])
    for handle in handles:
        handle.wait(600)
    full = [s for b, s in times.seconds if b == rows][
        1:
    ]  # the decoding steps with every row, not the prefill
    return 1000 * statistics.median(full)


def timed(work: Callable[[], object]) -> float:
    started = time.perf_counter()
    work()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "structured.md")
    args = parser.parse_args()
    ensure_model()
    settings = Settings(model_name=str(MODEL_DIR), dtype=args.dtype)
    loaded = load_model(settings, resolve_model(settings))
    times = StepTimes()
    engine = Engine(loaded.model, loaded.tokenizer, context_length=loaded.context_length, observer=times)
    engine.start()
    started = time.perf_counter()
    engine.grammars.lltokenizer
    index_s = time.perf_counter() - started
    ids = loaded.tokenizer.encode(PROMPT)
    median_step_ms(engine, times, ids, 1, JSON_CONSTRAINT)  # warm-up
    median_step_ms(engine, times, ids, 1, TOOL_CONSTRAINT)
    compile_ms = {
        kind: 1000 * min(timed(lambda: engine.grammars.guide(c)) for _ in range(20))
        for kind, c in (("JSON schema", JSON_CONSTRAINT), ("forced tool call", TOOL_CONSTRAINT))
    }
    rows = []
    for batch in (1, 8, 32):
        free = median_step_ms(engine, times, ids, batch, None)
        constrained = median_step_ms(engine, times, ids, batch, JSON_CONSTRAINT)
        called = median_step_ms(engine, times, ids, batch, TOOL_CONSTRAINT)
        rows.append((batch, free, constrained, called))
        print(
            f"{batch:>2} rows: free {free:.1f} ms, JSON {constrained:.1f} ms, tool call {called:.1f} ms",
            flush=True,
        )
    engine.stop()
    cpu = describe()
    flags = ", ".join(
        f for f in cpu["flags"] if f in ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16")
    )
    lines = [
        "# Structured output: cost per decoding step",
        "",
        f"CPU: {cpu['model']} ({cpu['isa_class']}: {flags}); torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"model: random-weight GPT-2 124M, GPT-2's vocabulary (50257 tokens), dtype {loaded.dtype}.",
        f"Indexing the vocabulary for llguidance (once, at warm-up): {index_s:.2f} s.",
        "",
        f"Median decoding step, every row generating {TOKENS} tokens inside a JSON string (the mask allows",
        "most of the vocabulary, the dearest state), sampled; `python bench/structured.py`.",
        "",
        "| rows | free | every row constrained | extra per step | extra per constrained row "
        "| every row a forced tool call | extra per row |",
        "|---|---|---|---|---|---|---|",
    ]
    for batch, free, constrained, called in rows:
        extra = constrained - free
        lines.append(
            f"| {batch} | {free:.1f} ms | {constrained:.1f} ms | {extra:+.1f} ms ({extra / free:+.0%}) "
            f"| {extra / batch:+.2f} ms | {called:.1f} ms | {(called - free) / batch:+.2f} ms |"
        )
    lines += [
        "",
        "Compiling a request's grammar (Grammars.guide, once per request, as it is submitted: on the "
        "server's event loop; best of 20): "
        + ", ".join(f"{kind} {ms:.2f} ms" for kind, ms in compile_ms.items())
        + ".",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(args.out.read_text())


if __name__ == "__main__":
    main()

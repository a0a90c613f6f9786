"""Benchmark workload W against textgen and, in the same run, the design it replaces.

Workload W: a 32-token prompt, 128 new tokens with EOS ignored, top-p sampling (temperature 0.7, top_p
0.9) and greedy, at 1, 4, 16 and 32 concurrent clients in a closed loop. The model is a random-weight
GPT-2 with the real GPT2Config() (124M parameters: exactly GPT-2's cost; see make_model.py).
The baseline is transformers.pipeline("text-generation") behind a plain HTTP handler, one request at a
time (baseline_server.py). Penalties and post-processing are off, as in the anchors' runs.

    python bench/run.py                        # fp32, writes bench/results/<date>-float32.{md,json,png}
    python bench/run.py --dtype bfloat16 --skip-baseline

Loopback only; every level is bounded in requests and time.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.server import Server, server_command, start_process  # noqa: E402

MODEL_DIR = Path("/tmp/textgen-bench/gpt2-random")
PROMPT_TOKENS, NEW_TOKENS = 32, 128
MODES = {"top-p": {"temperature": 0.7, "top_p": 0.9}, "greedy": {"temperature": 0.0}}
# Anchors measured on this machine for workload W (tok/s): (batch 1, batch 32), greedy / sampled.
ANCHORS = {
    "CTranslate2 int8": {"greedy": (65, 449), "top-p": (44, 231)},
    "llama.cpp q8_0": {"greedy": (156, 440), "top-p": (103, 185)},
    "transformers generate fp32": {"greedy": (24, 196), "top-p": (22, 121)},
}


@dataclass
class Level:
    system: str
    mode: str
    clients: int
    requests: int
    errors: int
    tokens: int
    seconds: float
    tokens_per_second: float
    ttft_p50_ms: float
    latency_p50_s: float
    latency_p95_s: float
    peak_rss_mb: float


def ensure_model() -> None:
    """The random-weight GPT-2 (124M) the benchmarks serve, built once (make_model.py)."""
    if not (MODEL_DIR / "config.json").is_file():
        import subprocess

        subprocess.run([sys.executable, str(ROOT / "bench" / "make_model.py"), str(MODEL_DIR)], check=True)


def prompt_of_exactly(n: int) -> str:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    text = "The history of computing is a story of people, ideas and machines that changed how we live. " * 8
    ids = tokenizer.encode(text)[:n]
    prompt = tokenizer.decode(ids)
    assert len(tokenizer.encode(prompt)) == n
    return prompt


def peak_rss_mb(pid: int) -> float:
    """Largest peak resident set (VmHWM) among the server's processes: the one holding the model."""
    import psutil

    peaks = []
    for proc in [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]:
        try:
            status = Path(f"/proc/{proc.pid}/status").read_text()
        except OSError:
            continue
        kb = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM"))
        peaks.append(kb / 1024)
    return max(peaks)


async def run_level(
    server: Server, system: str, mode: str, clients: int, requests: int, prompt: str
) -> Level:
    body = dict(prompt=prompt, max_new_tokens=NEW_TOKENS, ignore_eos=True, **MODES[mode])
    if system == "textgen":
        body.update(repetition_penalty=1.0, no_repeat_ngram_size=0, postprocess=False)
    latencies: list[float] = []
    ttfts: list[float] = []
    tokens = errors = 0
    queue = list(range(requests))

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal tokens, errors
        while queue:
            queue.pop()
            start = time.perf_counter()
            try:
                response = await http.post("/generate", json=body)
                latency = time.perf_counter() - start
                if response.status_code != 200:
                    errors += 1
                    continue
                data = response.json()
            except httpx.HTTPError:
                errors += 1
                continue
            latencies.append(latency)
            tokens += data["usage"]["completion_tokens"]
            # textgen reports its time to first token; the baseline's clients see nothing before the end.
            ttfts.append(data["timings"]["first_token_ms"] / 1000 if "timings" in data else latency)

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=server.url, timeout=900, limits=limits) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        seconds = time.perf_counter() - start
    ordered = sorted(latencies) or [float("nan")]
    return Level(
        system=system,
        mode=mode,
        clients=clients,
        requests=requests,
        errors=errors,
        tokens=tokens,
        seconds=round(seconds, 2),
        tokens_per_second=round(tokens / seconds, 1),
        ttft_p50_ms=round(statistics.median(ttfts) * 1000, 1) if ttfts else float("nan"),
        latency_p50_s=round(statistics.median(ordered), 2),
        latency_p95_s=round(ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))], 2),
        peak_rss_mb=round(peak_rss_mb(server.process.pid), 0),
    )


def bench_system(system: str, server: Server, levels: list[int], prompt: str, per_client: int) -> list[Level]:
    results = []
    for mode in MODES:
        asyncio.run(run_level(server, system, mode, 1, 2, prompt))  # warm up this decoding mode
        for clients in levels:
            requests = max(clients * per_client, 4) if system == "textgen" else max(clients, 2)
            level = asyncio.run(run_level(server, system, mode, clients, requests, prompt))
            print(json.dumps(asdict(level)), flush=True)
            results.append(level)
    return results


def markdown(results: list[Level], dtype: str, threads: int) -> str:
    lines = [
        f"Workload W, random-weight GPT-2 124M, textgen dtype {dtype}, {threads} torch threads, "
        f"{dt.date.today()}.",
        "",
        "| system | decoding | clients | tok/s | TTFT p50 ms | latency p50 s | p95 s | errors | peak RSS MB |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        lines.append(
            f"| {r.system} | {r.mode} | {r.clients} | {r.tokens_per_second} | {r.ttft_p50_ms} | "
            f"{r.latency_p50_s} | {r.latency_p95_s} | {r.errors} | {r.peak_rss_mb:.0f} |"
        )
    by_key = {(r.system, r.mode, r.clients): r.tokens_per_second for r in results}
    for mode in MODES:
        ours, theirs = by_key.get(("textgen", mode, 32)), by_key.get(("baseline", mode, 32))
        if ours and theirs:
            lines.append(f"\n{mode} at 32 clients: textgen {ours} tok/s = {ours / theirs:.1f}x the baseline.")
    quality = ROOT / "bench" / "results" / "quality.md"
    if quality.is_file():  # written by bench/quality.py on the real SmolLM2: what the speed costs
        lines += ["", "## Quality of the weight formats (bench/quality.py)", "", quality.read_text().strip()]
    return "\n".join(lines) + "\n"


def plot(results: list[Level], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, mode in zip(axes, MODES):
        for system, style in (("textgen", "o-"), ("baseline", "s--")):
            rows = [r for r in results if r.system == system and r.mode == mode]
            if rows:
                ax.plot([r.clients for r in rows], [r.tokens_per_second for r in rows], style, label=system)
        for name, anchor in ANCHORS.items():
            ax.plot([1, 32], anchor[mode], ":", marker="x", alpha=0.6, label=name)
        ax.set_xscale("log", base=2)
        ax.set_xticks([1, 4, 16, 32], ["1", "4", "16", "32"])
        ax.set_title(f"workload W, {mode}")
        ax.set_xlabel("concurrent clients")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("aggregate tokens/s")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "int8"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--levels", default="1,4,16,32")
    parser.add_argument("--per-client", type=int, default=2, help="textgen requests per client per level")
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    levels = [int(x) for x in args.levels.split(",")]

    ensure_model()
    prompt = prompt_of_exactly(PROMPT_TOKENS)

    env = {"MODEL_NAME": str(MODEL_DIR), "TEXTGEN_DTYPE": args.dtype, "TEXTGEN_THREADS": str(args.threads)}
    results: list[Level] = []
    with start_process(server_command, env) as server:
        results += bench_system("textgen", server, levels, prompt, args.per_client)
    if not args.skip_baseline:
        baseline = lambda port: [  # noqa: E731
            sys.executable,
            str(ROOT / "bench" / "baseline_server.py"),
            str(MODEL_DIR),
            "--port",
            str(port),
            "--threads",
            str(args.threads),
        ]
        with start_process(baseline, {}, ready_path="/") as server:
            results += bench_system("baseline", server, levels, prompt, args.per_client)

    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"{dt.date.today()}-{args.dtype}"
    stem.with_suffix(".json").write_text(json.dumps([asdict(r) for r in results], indent=1))
    stem.with_suffix(".md").write_text(markdown(results, args.dtype, args.threads))
    plot(results, stem.with_suffix(".png"))
    print(stem.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()

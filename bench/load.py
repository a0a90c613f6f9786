"""Load test: steady load, an overload burst, and recovery, against one textgen server (loopback).

    python bench/load.py                 # bf16 GPT-2-sized model; writes bench/results/<date>-load.{md,json}

1. steady: 200 requests at concurrency 64 (32-token prompt, 32 sampled tokens): none lost, no 5xx.
   With the default limits (32 running + TEXTGEN_MAX_QUEUE=128 waiting) none should be refused either.
2. burst: 400 requests at once: the queue overflows, so some get 429 (with Retry-After), quickly;
   the accepted ones complete; still no 5xx.
3. recovery: 20 requests at concurrency 4 right after: all 200; the in-flight gauges are back to 0.

Bounded: 620 requests in all, each with a 300 s client timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import datetime as dt
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.run import MODEL_DIR, ensure_model, prompt_of_exactly  # noqa: E402
from tests.server import Server, server_command, start_process, stop_on_sigterm  # noqa: E402
from tests.test_service import metric  # noqa: E402

PROBES = 30
PROBE = f"""
import json, sys, time, httpx
url, body, times = sys.argv[1], json.loads(sys.argv[2]), []
with httpx.Client(base_url=url, timeout=300) as http:
    for _ in range({PROBES}):
        start = time.perf_counter()
        status = http.post("/generate", json=body).status_code
        times.append((status, time.perf_counter() - start))
        time.sleep(0.2)
print(json.dumps(times))
"""


@dataclass
class Phase:
    name: str
    requests: int
    concurrency: int
    seconds: float = 0.0
    statuses: dict[str, int] = field(default_factory=dict)
    lost: int = 0  # no HTTP answer at all (connection error or client timeout)
    ok_latency_p50_s: float | None = None
    ok_latency_max_s: float | None = None
    refused_latency_p50_ms: float | None = None
    refused_latency_max_ms: float | None = None
    refused_without_retry_after: int = 0
    # While the burst holds the queue full: single requests from another process, one at a time, each timed
    # from its own send (the burst's own refusal times include the client's and the server's queueing of 400
    # arrivals).
    probe_429_p50_ms: float | None = None
    probe_429_max_ms: float | None = None
    probe_429_p95_ms: float | None = None
    probes_refused: int = 0


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def run_phase(server: Server, name: str, requests: int, concurrency: int, body: dict) -> Phase:
    phase = Phase(name, requests, concurrency)
    statuses: collections.Counter[str] = collections.Counter()
    ok: list[float] = []
    refused: list[float] = []
    pending = list(range(requests))

    async def client(http: httpx.AsyncClient) -> None:
        while pending:
            pending.pop()
            start = time.perf_counter()
            try:
                response = await http.post("/generate", json=body)
            except httpx.HTTPError:
                phase.lost += 1
                continue
            elapsed = time.perf_counter() - start
            statuses[str(response.status_code)] += 1
            if response.status_code == 200:
                ok.append(elapsed)
            elif response.status_code == 429:
                refused.append(elapsed)
                phase.refused_without_retry_after += "retry-after" not in response.headers

    async def probe(probes: list[float]) -> None:
        await asyncio.sleep(3)  # the burst has arrived and fills the queue
        # From a process of its own, so the times are the server's and not this client's event loop, busy
        # with 400 connections.
        child = await asyncio.create_subprocess_exec(
            sys.executable, "-c", PROBE, server.url, json.dumps(body), stdout=asyncio.subprocess.PIPE
        )
        out, _ = await child.communicate()
        probes.extend(seconds for status, seconds in json.loads(out) if status == 429)

    probes: list[float] = []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=server.url, timeout=300, limits=limits) as http:
        start = time.perf_counter()
        extra = [probe(probes)] if name == "burst" else []
        await asyncio.gather(*(client(http) for _ in range(concurrency)), *extra)
        phase.seconds = round(time.perf_counter() - start, 2)
    phase.probe_429_p50_ms = _round(_ms(percentile(probes, 0.5)), 1)
    phase.probes_refused = len(probes)
    phase.probe_429_p95_ms = _round(_ms(percentile(probes, 0.95)), 1)
    phase.probe_429_max_ms = _round(_ms(max(probes, default=None)), 1)
    phase.statuses = dict(sorted(statuses.items()))
    phase.ok_latency_p50_s = _round(percentile(ok, 0.5), 2)
    phase.ok_latency_max_s = _round(max(ok, default=None), 2)
    phase.refused_latency_p50_ms = _round(_ms(percentile(refused, 0.5)), 1)
    phase.refused_latency_max_ms = _round(_ms(max(refused, default=None)), 1)
    return phase


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def verdicts(phases: list[Phase], gauges: dict[str, float]) -> list[str]:
    steady, burst, recovery = phases
    five_xx = sum(n for p in phases for status, n in p.statuses.items() if status.startswith("5"))
    return [
        f"steady: {steady.statuses.get('200', 0)}/{steady.requests} answered 200, {steady.lost} lost",
        f"burst: {burst.statuses.get('429', 0)} refused with 429 "
        f"({burst.refused_without_retry_after} without Retry-After), "
        f"slowest refusal in the burst {burst.refused_latency_max_ms} ms; a request arriving while the queue is "
        f"full is refused in {burst.probe_429_p50_ms} ms (median of {burst.probes_refused} refused probes from another process, "
        f"p95 {burst.probe_429_p95_ms} ms, slowest {burst.probe_429_max_ms} ms); "
        f"{burst.statuses.get('200', 0)} accepted and completed",
        f"recovery: {recovery.statuses.get('200', 0)}/{recovery.requests} answered 200",
        f"5xx in all phases: {five_xx}; lost in all phases: {sum(p.lost for p in phases)}",
        f"after the run: running {gauges['running']:g}, waiting {gauges['waiting']:g}",
    ]


def markdown(phases: list[Phase], checks: list[str], dtype: str) -> str:
    lines = [
        f"# Load test ({dt.date.today()}, {dtype}, GPT-2-sized random model, 2 threads, loopback)",
        "",
        "| phase | requests | concurrency | seconds | statuses | lost | 200 p50 / max (s) | 429 p50 / max (ms) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for p in phases:
        lines.append(
            f"| {p.name} | {p.requests} | {p.concurrency} | {p.seconds} | {p.statuses} | {p.lost} | "
            f"{p.ok_latency_p50_s} / {p.ok_latency_max_s} | {p.refused_latency_p50_ms} / {p.refused_latency_max_ms} |"
        )
    return "\n".join([*lines, "", *(f"- {c}" for c in checks), ""])


def main() -> int:
    stop_on_sigterm()
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--dtype", default="bfloat16", choices=["float32", "bfloat16", "bfloat16-int8head", "int8"]
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    ensure_model()
    body = {
        "prompt": prompt_of_exactly(32),
        "max_new_tokens": 32,
        "ignore_eos": True,
        "temperature": 0.7,
        "top_p": 0.9,
    }
    env = {"MODEL_NAME": str(MODEL_DIR), "TEXTGEN_DTYPE": args.dtype, "TEXTGEN_THREADS": "2"}
    with start_process(server_command, env) as server:
        phases = [
            asyncio.run(run_phase(server, "steady", 200, 64, body)),
            asyncio.run(run_phase(server, "burst", 400, 400, {**body, "max_new_tokens": 64})),
            asyncio.run(run_phase(server, "recovery", 20, 4, body)),
        ]
        time.sleep(1)
        gauges = {
            "running": metric(server, "textgen_running_sequences"),
            "waiting": metric(server, "textgen_waiting_requests"),
        }
    checks = verdicts(phases, gauges)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"{dt.date.today()}-load"
    stem.with_suffix(".json").write_text(json.dumps([asdict(p) for p in phases] + [gauges], indent=1))
    stem.with_suffix(".md").write_text(markdown(phases, checks, args.dtype))
    print(stem.with_suffix(".md").read_text())
    steady, burst, recovery = phases
    passed = (
        steady.statuses == {"200": steady.requests}
        and burst.statuses.get("429", 0) > 0
        and set(burst.statuses) <= {"200", "429"}
        and burst.refused_without_retry_after == 0
        and recovery.statuses == {"200": recovery.requests}
        and sum(p.lost for p in phases) == 0
        and gauges == {"running": 0, "waiting": 0}
    )
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())

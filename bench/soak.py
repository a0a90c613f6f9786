"""Soak test: a long mixed workload against one textgen server (loopback), its memory sampled throughout.

    python bench/soak.py                      # tiny GPT-2 (tests/tiny_model.py), 20000 requests
    python bench/soak.py --requests 5000 --concurrency 16

The mix, drawn from a seeded generator: /generate (greedy and sampled, stop strings), /generate_stream,
/v1/completions (n = 1 or 2), /v1/chat/completions (JSON and streamed), cancellations (a stream closed after
its first event; a /generate whose client gives up after 100 ms) and invalid requests (bad JSON, unknown
fields, values out of range, a wrong content type, an unknown model). Every answer is checked: the expected
status, a well-formed body, a complete stream.

Reported: lost requests (no HTTP answer where one was due), unexpected 5xx, the server's RSS at request
`--warmup` and after it (growth target: within 5%), and the engine's gauges once idle (all back to 0).
Writes bench/results/<date>-soak.md and .json. Bounded: every request has a client timeout, the run a
request count.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import datetime as dt
import json
import os
import random
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.server import Server, start_server, stop_on_sigterm  # noqa: E402
from tests.test_service import metric  # noqa: E402
from tests.tiny_model import build_tiny_gpt2  # noqa: E402
from textgen.model.cpu import describe  # noqa: E402

TINY_DIR = Path("/tmp/textgen-bench/tiny-gpt2-512")
KINDS = {  # kind: share of the requests
    "generate": 0.25,
    "generate_stream": 0.15,
    "completions": 0.12,
    "chat": 0.08,
    "chat_stream": 0.08,
    "cancel_stream": 0.08,
    "cancel_timeout": 0.06,
    "invalid": 0.18,
}
PROMPTS = [
    "What is AI?",
    "The quick brown fox",
    "Paris is the capital of France; Rome is",
    "Question: what is the weather like today? Answer:",
    "Café 東京 🙂 and emoji",
    "Language models predict the next token from the tokens before it.",
]
CLIENT_TIMEOUT = 120.0


@dataclass
class Tally:
    sent: int = 0
    by_kind: dict[str, dict[str, int]] = field(default_factory=lambda: collections.defaultdict(dict))
    lost: int = 0  # no HTTP answer where one was due (connection error, client timeout)
    unexpected_5xx: int = 0
    wrong: list[str] = field(default_factory=list)  # answers that were not what the kind expects
    done: int = 0

    def count(self, kind: str, outcome: str) -> None:
        self.by_kind[kind][outcome] = self.by_kind[kind].get(outcome, 0) + 1


@dataclass
class Sample:
    seconds: float
    done: int  # requests completed when sampled
    worker_rss_mb: float
    total_rss_mb: float


def server_processes(root: int) -> list[int]:
    """`root` and its descendants (circus starts the worker in a session of its own, so not by group)."""
    parents: dict[int, list[int]] = collections.defaultdict(list)
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                parents[int(fields[1])].append(int(entry))  # field 4 of stat: the parent
            except (OSError, IndexError, ValueError):
                pass
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(parents.get(pid, []))
    return found


def rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class RssSampler(threading.Thread):
    """Samples the server's RSS (the worker: its largest process; and all its processes) every `period` s."""

    def __init__(self, root: int, tally: Tally, period: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.root, self.tally, self.period = root, tally, period
        self.samples: list[Sample] = []
        self.stop = threading.Event()
        self.started = time.monotonic()

    def sample(self) -> Sample:
        sizes = [rss_mb(pid) for pid in server_processes(self.root)]
        return Sample(
            round(time.monotonic() - self.started, 2), self.tally.done, max(sizes, default=0), sum(sizes)
        )

    def run(self) -> None:
        while not self.stop.wait(self.period):
            self.samples.append(self.sample())


def plan(requests: int, seed: int) -> list[tuple[str, dict[str, Any]]]:
    """The workload: (kind, parameters) per request, reproducible from the seed."""
    rng = random.Random(seed)
    kinds, weights = zip(*KINDS.items())
    out = []
    for _ in range(requests):
        kind = rng.choices(kinds, weights)[0]
        out.append(
            (
                kind,
                {
                    "prompt": rng.choice(PROMPTS),
                    "tokens": rng.randint(1, 48),
                    "greedy": rng.random() < 0.5,
                    "seed": rng.randrange(1 << 30),
                    "n": rng.choice([1, 1, 2]),
                    "stop": rng.random() < 0.2,
                    "invalid": rng.randrange(6),
                },
            )
        )
    return out


def sampling(p: dict[str, Any]) -> dict[str, Any]:
    return {"temperature": 0} if p["greedy"] else {"temperature": 0.8, "top_p": 0.9, "seed": p["seed"]}


def sse_data(lines: list[str]) -> list[str]:
    return [line[6:] for line in lines if line.startswith("data: ")]


async def one(http: httpx.AsyncClient, kind: str, p: dict[str, Any], model: str, tally: Tally) -> None:
    """Send one request of `kind` and check its answer."""

    def expect(ok: bool, what: str) -> None:
        tally.count(kind, "ok" if ok else "wrong")
        if not ok and len(tally.wrong) < 20:
            tally.wrong.append(f"{kind}: {what}")

    generate_body = {"prompt": p["prompt"], "max_new_tokens": p["tokens"], **sampling(p)}
    if p["stop"]:
        generate_body["stop"] = ["."]
    try:
        if kind == "generate":
            r = await http.post("/generate", json=generate_body)
            tally.unexpected_5xx += r.status_code >= 500
            expect(r.status_code == 200 and isinstance(r.json().get("generated_text"), str), r.text[:200])
        elif kind in ("generate_stream", "chat_stream"):
            if kind == "generate_stream":
                path, body = "/generate_stream", generate_body
            else:
                path = "/v1/chat/completions"
                body = {
                    "model": model,
                    "messages": [{"role": "user", "content": p["prompt"]}],
                    "max_tokens": p["tokens"],
                    "stream": True,
                    **sampling(p),
                }
            async with http.stream("POST", path, json=body) as r:
                lines = [line async for line in r.aiter_lines()]
            tally.unexpected_5xx += r.status_code >= 500
            data = sse_data(lines)
            if kind == "generate_stream":
                complete = bool(data) and "finish_reason" in json.loads(data[-1])
            else:
                complete = bool(data) and data[-1] == "[DONE]"
            expect(r.status_code == 200 and complete, f"{r.status_code} {lines[-3:]}")
        elif kind == "completions":
            body = {
                "model": model,
                "prompt": p["prompt"],
                "max_tokens": p["tokens"],
                "n": p["n"],
                **sampling(p),
            }
            r = await http.post("/v1/completions", json=body)
            tally.unexpected_5xx += r.status_code >= 500
            expect(r.status_code == 200 and len(r.json().get("choices", [])) == p["n"], r.text[:200])
        elif kind == "chat":
            body = {
                "model": model,
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": p["prompt"]},
                ],
                "max_tokens": p["tokens"],
                **sampling(p),
            }
            r = await http.post("/v1/chat/completions", json=body)
            tally.unexpected_5xx += r.status_code >= 500
            expect(
                r.status_code == 200 and r.json()["choices"][0]["message"]["role"] == "assistant",
                r.text[:200],
            )
        elif kind == "cancel_stream":  # the client closes the connection after the first event
            body = {**generate_body, "max_new_tokens": 200, "ignore_eos": True}
            async with http.stream("POST", "/generate_stream", json=body) as r:
                tally.unexpected_5xx += r.status_code >= 500
                async for line in r.aiter_lines():
                    if line.startswith("data: "):
                        break
            expect(r.status_code == 200, str(r.status_code))
        elif kind == "cancel_timeout":  # the client gives up before the answer
            body = {**generate_body, "max_new_tokens": 200, "ignore_eos": True}
            try:
                r = await http.post("/generate", json=body, timeout=0.1)
                tally.unexpected_5xx += r.status_code >= 500
                expect(r.status_code == 200, f"answered before the client gave up: {r.status_code}")
            except httpx.TimeoutException:
                tally.count(kind, "ok")
        else:
            await invalid(http, p, model, tally, expect)
    except httpx.HTTPError as exc:
        tally.lost += 1
        if len(tally.wrong) < 20:
            tally.wrong.append(f"{kind}: lost ({type(exc).__name__}: {exc})")
    finally:
        tally.done += 1


async def invalid(http: httpx.AsyncClient, p: dict[str, Any], model: str, tally: Tally, expect: Any) -> None:
    variant = p["invalid"]
    if variant == 0:
        r = await http.post(
            "/generate", content=b'{"prompt": "x",', headers={"Content-Type": "application/json"}
        )
        want = 400
    elif variant == 1:
        r = await http.post("/generate", json={"prompt": "x", "temprature": 0.5})
        want = 400
    elif variant == 2:
        r = await http.post("/generate_stream", json={"prompt": "x", "top_p": 2})
        want = 400
    elif variant == 3:
        r = await http.post("/generate", content=b"prompt=x", headers={"Content-Type": "text/plain"})
        want = 415
    elif variant == 4:
        r = await http.post("/v1/completions", json={"model": "no-such-model", "prompt": "x"})
        want = 404
    else:
        r = await http.post("/v1/chat/completions", json={"model": model, "messages": [], "temperature": 9})
        want = 400
    tally.unexpected_5xx += r.status_code >= 500
    body = r.json()
    expect(r.status_code == want and "error" in body, f"{r.status_code} (wanted {want}) {r.text[:120]}")


async def drive(
    server: Server, work: list[tuple[str, dict[str, Any]]], concurrency: int, tally: Tally
) -> float:
    queue = collections.deque(work)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=server.url, timeout=CLIENT_TIMEOUT, limits=limits) as http:
        model = (await http.get("/v1/models")).json()["data"][0]["id"]

        async def worker() -> None:
            while queue:
                kind, p = queue.popleft()
                tally.sent += 1
                await one(http, kind, p, model, tally)

        started = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.monotonic() - started


def rss_at(samples: list[Sample], done: int) -> Sample:
    return next(s for s in samples if s.done >= done)


def main() -> int:
    stop_on_sigterm()
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--concurrency", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=500, help="RSS growth is measured from this request on")
    parser.add_argument("--seed", type=int, default=16)
    parser.add_argument(
        "--threads", type=int, default=1, help="TEXTGEN_THREADS (the other core drives the load)"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="server environment")
    args = parser.parse_args()
    if args.requests < 2 * args.warmup:
        parser.error("--requests must be at least twice --warmup")

    if not (TINY_DIR / "config.json").is_file():
        build_tiny_gpt2(TINY_DIR, n_positions=512)
    env = {
        "MODEL_NAME": str(TINY_DIR),
        "TEXTGEN_DTYPE": "float32",
        "TEXTGEN_THREADS": str(args.threads),
        "TEXTGEN_TIMEOUT": "60",
        "TEXTGEN_CACHE_DIR": "/tmp/textgen-bench/cache",
        **dict(item.split("=", 1) for item in args.env),
    }
    tally = Tally()
    work = plan(args.requests, args.seed)
    with start_server(env) as server:
        sampler = RssSampler(server.process.pid, tally)
        start_rss = sampler.sample()
        sampler.start()
        seconds = asyncio.run(drive(server, work, args.concurrency, tally))
        time.sleep(2)  # idle: cancelled sequences have left, buffers are freed
        sampler.stop.set()
        sampler.join()
        idle = sampler.sample()
        gauges = {
            name: metric(server, name)
            for name in (
                "textgen_running_sequences",
                "textgen_waiting_requests",
                "textgen_kv_reserved_tokens",
                "textgen_kv_cache_bytes",
            )
        }
        server_counts = {
            reason: metric(server, f'textgen_requests_finished_total{{reason="{reason}"}}')
            for reason in ("length", "stop", "eos", "cancelled", "error")
        }
    samples = sampler.samples
    at_warmup = rss_at(samples, args.warmup)
    after = [s for s in samples if s.done >= args.warmup]
    peak = max(after, key=lambda s: s.worker_rss_mb)
    growth_end = (idle.worker_rss_mb - at_warmup.worker_rss_mb) / at_warmup.worker_rss_mb * 100
    growth_peak = (peak.worker_rss_mb - at_warmup.worker_rss_mb) / at_warmup.worker_rss_mb * 100
    statuses = {kind: dict(v) for kind, v in sorted(tally.by_kind.items())}
    result = {
        "date": str(dt.date.today()),
        "cpu": describe(),
        "requests": tally.done,
        "concurrency": args.concurrency,
        "seconds": round(seconds, 1),
        "lost": tally.lost,
        "unexpected_5xx": tally.unexpected_5xx,
        "wrong": tally.wrong,
        "outcomes": statuses,
        "server_finished": server_counts,
        "gauges_after": gauges,
        "rss_mb": {
            "start": round(start_rss.worker_rss_mb, 1),
            f"at_request_{args.warmup}": round(at_warmup.worker_rss_mb, 1),
            "peak_after_warmup": round(peak.worker_rss_mb, 1),
            "peak_at_request": peak.done,
            "end_idle": round(idle.worker_rss_mb, 1),
            "growth_end_percent": round(growth_end, 2),
            "growth_peak_percent": round(growth_peak, 2),
        },
        "samples": [asdict(s) for s in samples],
    }
    passed = (
        tally.lost == 0
        and tally.unexpected_5xx == 0
        and not tally.wrong
        and abs(growth_end) <= 5
        and growth_peak <= 5
        and gauges["textgen_running_sequences"] == 0
        and gauges["textgen_waiting_requests"] == 0
    )
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"{dt.date.today()}-soak"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1))
    stem.with_suffix(".md").write_text(markdown(result, args, samples, passed))
    print(stem.with_suffix(".md").read_text())
    return 0 if passed else 1


def markdown(result: dict[str, Any], args: argparse.Namespace, samples: list[Sample], passed: bool) -> str:
    cpu = result["cpu"]
    rss = result["rss_mb"]
    lines = [
        f"# Soak test ({result['date']}, tiny GPT-2, float32, TEXTGEN_THREADS={args.threads}, loopback)",
        "",
        f"CPU: {cpu['model']} ({cpu['isa_class']}, {cpu['cores']} usable cores). "
        f"`python bench/soak.py --requests {args.requests} --concurrency {args.concurrency} "
        f"--seed {args.seed}`",
        "",
        f"{result['requests']} requests in {result['seconds']} s at concurrency {result['concurrency']}: "
        f"**{result['lost']} lost, {result['unexpected_5xx']} unexpected 5xx, "
        f"{len(result['wrong'])} wrong answers**. "
        f"{'PASS' if passed else 'FAIL'}.",
        "",
        "| kind | share | outcomes |",
        "| --- | ---: | --- |",
    ]
    for kind, share in KINDS.items():
        lines.append(f"| {kind} | {share:.0%} | {result['outcomes'].get(kind, {})} |")
    lines += [
        "",
        "Server RSS (the worker process), MB:",
        "",
        f"| at start | at request {args.warmup} | peak after it | at the end, idle | growth at the end "
        "| growth at the peak |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
        f"| {rss['start']} | {rss[f'at_request_{args.warmup}']} | {rss['peak_after_warmup']} (request "
        f"{rss['peak_at_request']}) | {rss['end_idle']} | {rss['growth_end_percent']:+.2f}% | "
        f"{rss['growth_peak_percent']:+.2f}% |",
        "",
        "RSS every 500 requests: "
        + ", ".join(
            f"{n}: {rss_at(samples, n).worker_rss_mb:.0f}"
            for n in range(0, result["requests"], 500)
            if any(s.done >= n for s in samples)
        ),
        "",
        f"Finished in the engine, by reason: {result['server_finished']}.",
        f"Gauges once idle: {result['gauges_after']}.",
    ]
    if result["wrong"]:
        lines += ["", "Wrong answers (first 20):", *(f"- {w}" for w in result["wrong"])]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())

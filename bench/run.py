"""Workload W on the machine at hand: its roofline, textgen per weight format, the anchors and the old service.

Workload W: a 32-token prompt (every request its own), 128 new tokens with EOS ignored, top-p sampling
(temperature 0.7, top_p 0.9) and greedy, concurrent clients in a closed loop against HTTP /generate. The
model is a random-weight GPT-2 with the real GPT2Config() (124M parameters: exactly GPT-2's cost; see
make_model.py). Penalties and post-processing are off, as in the anchors' runs.

Everything is measured in the same run, on this machine, and the report names the CPU it came from:
- the roofline (textgen/model/probe.py): memory bandwidth, the fastest that any format's 1-row product or a
  plain read streamed over GPT-2-sized weights (reads the caches could serve left out: memory_rate), and
  GEMM peak at 1024 rows, per format; each rate the fastest of the probes spread over the run (the host's
  speed moves within minutes);
- the anchors (bench/anchors.py): CTranslate2 int8/float32 and llama.cpp q8_0/f32, in-process;
- textgen for every TEXTGEN_DTYPE (auto first, and what auto chose and why), as % of the roofline of the
  format it serves: memory roofline at 1 client (a step streams every weight once), compute roofline at 32;
  auto's server then takes turns with the fastest anchor at one client (paired_one_stream). The format auto
  serves is not run again, and a format this CPU emulates runs at one client only (plan_formats);
- the old service: transformers.pipeline behind a plain HTTP handler (baseline_server.py), one at a time.
The report ends with issue #12's targets, each judged on this run's own figures (bench/targets.py).

    pip install -r requirements-bench.txt     # the anchors; llama-cpp-python builds from source
    python bench/run.py                       # bench/results/<date>-<cpu class>.{md,json}

Another CPU class's kernels on this machine: cap the kernel libraries (textgen/model/cpu.py), e.g. the AVX2
class on an AVX-512 host. The caps reach every server and anchor this script starts (they inherit its
environment; each server's GET /info is checked), the report names the caps and the real CPU, and the file
is bench/results/<date>-<class>-capped-on-<real class>. llama.cpp's ISA is fixed when it is built, so only
the CTranslate2 anchors follow the caps (their GEMMs are oneMKL's):

    ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 FBGEMM_ENABLE_INSTRUCTIONS=AVX2 \
        ATEN_CPU_CAPABILITY=avx2 python bench/run.py --anchors "CTranslate2 int8"

Loopback only; every level is bounded in requests and time (LEVEL_SECONDS), and the report says how long the
run took: issue #12 asks for 20 minutes. Nothing else may run meanwhile.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench import targets  # noqa: E402
from bench.anchors import PROMPT_TEXT, llama_cpp_sdist  # noqa: E402
from tests.server import Server, server_command, start_process, stop_on_sigterm  # noqa: E402
from textgen.config import DTYPES as SERVED_DTYPES  # noqa: E402  (no torch: textgen/config.py)

if TYPE_CHECKING:
    from textgen.model.cpu import CpuInfo

MODEL_DIR = Path("/tmp/textgen-bench/gpt2-random")
PROMPT_TOKENS, NEW_TOKENS = 32, 128
MODES = {"top-p": {"temperature": 0.7, "top_p": 0.9}, "greedy": {"temperature": 0.0}}
# One client's figures (tok/s, TTFT's median) come from at least this many requests: from 4, one run (session
# 29, AMX Xeon) gave the same format's TTFT as 22.3 ms on `auto`'s server and 15.9 on its own, and a first
# token ~10 ms late comes in 1 request of 7-40 on that host (2026-12-06: 17.2 ms median, 6 of 40 at 24-31).
ONE_CLIENT_REQUESTS = 8
# A level stops sending after this many seconds (every client has had one request by then): on the AMX Xeon
# no level of W reached it (session 33: float32's and float32-packed's longest 24-28 s), but at issue #12's
# AVX2 EPYC's 14 tok/s one client's 8 requests alone would take 73 s, and the run must fit in
# targets.MAX_RUN_MINUTES on any CPU.
LEVEL_SECONDS = 30.0


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
    dtype: str = ""


def ensure_model() -> None:
    """The random-weight GPT-2 (124M) the benchmarks serve, built once (make_model.py), with GPT-2's real
    vocabulary (`gpt2_vocabulary`)."""
    if not (MODEL_DIR / "config.json").is_file():
        import subprocess

        command = [sys.executable, str(ROOT / "bench" / "make_model.py"), str(MODEL_DIR)]
        vocabulary = gpt2_vocabulary()
        if vocabulary is not None:
            command += ["--vocab", str(vocabulary)]
        subprocess.run(command, check=True)


def gpt2_vocabulary() -> Path | None:
    """GPT-2's vocabulary-only GGUF: beside the project (make_model.py's default, ../shared/data) or, for a
    clone elsewhere, in the llama-cpp-python sdist the anchors' converter comes from (vendor/llama.cpp/
    models/, where ../shared's copy comes from). Without it make_model.py trains a stand-in tokenizer,
    which the anchors' converters refuse (session 43: a clone in /tmp ran without anchors)."""
    from bench.make_model import DEFAULT_VOCAB  # here: it imports transformers

    if DEFAULT_VOCAB.is_file():
        return DEFAULT_VOCAB
    try:
        found = llama_cpp_sdist() / "models" / "ggml-vocab-gpt-2.gguf"
    except RuntimeError as exc:  # llama-cpp-python not installed, or its sdist not to be had
        print(f"GPT-2's vocabulary not found ({exc}): a stand-in tokenizer", file=sys.stderr, flush=True)
        return None
    return found if found.is_file() else None


class Prompts:
    """Workload W's prompts, exactly n tokens each: every request its own ("<k>. " before the anchors' text,
    bench/anchors.py, which they compute afresh for every sequence), as load testers send them (guidellm's
    synthetic data, vLLM's random dataset). With one prompt repeated, textgen's prefix cache served some
    requests from the KV of earlier ones, and whether it did depended on the prefill cost it had fitted:
    1-client TTFT 11-13 ms greedy against 25-30 top-p in the same runs (sessions 20-21, Zen 4)."""

    def __init__(self, n: int) -> None:
        from transformers import AutoTokenizer

        self.n = n
        self.tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
        self.count = 0

    def next(self) -> str:
        """A prompt no request of this run was sent before."""
        while True:
            self.count += 1
            prompt = self._exactly(f"{self.count}. {PROMPT_TEXT}")
            if prompt:
                return prompt

    def _exactly(self, text: str) -> str:
        """`text` cut to n tokens, or "" when the cut does not encode back to n tokens."""
        prompt = self.tokenizer.decode(self.tokenizer.encode(text)[: self.n])
        return prompt if len(self.tokenizer.encode(prompt)) == self.n else ""


def peak_rss_mb(pid: int) -> float:
    """Largest peak resident set (VmHWM) among the server's processes, the one holding the model, in MiB
    (`peak_rss_mb`: the name reports have kept since before it said so)."""
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
    server: Server,
    system: str,
    mode: str,
    clients: int,
    requests: int,
    prompts: Prompts,
    seconds: float = float("inf"),
) -> Level:
    """`clients` in a closed loop until `requests` are done, or until `seconds` have passed and every client
    has had one (no request is cut short: the level ends when the last one in flight does)."""
    body: dict[str, Any] = dict(max_new_tokens=NEW_TOKENS, ignore_eos=True, **MODES[mode])
    if system == "textgen":
        body.update(repetition_penalty=1.0, no_repeat_ngram_size=0, postprocess=False)
    latencies: list[float] = []
    ttfts: list[float] = []
    tokens = errors = 0
    queue = list(range(requests))

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal tokens, errors
        sent = 0
        while queue and (sent == 0 or time.perf_counter() - began < seconds):
            queue.pop()
            sent += 1
            sent_at = time.perf_counter()
            try:
                response = await http.post("/generate", json=body | {"prompt": prompts.next()})
                latency = time.perf_counter() - sent_at
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
        began = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        elapsed = time.perf_counter() - began
    ordered = sorted(latencies) or [float("nan")]
    return Level(
        system=system,
        mode=mode,
        clients=clients,
        requests=requests - len(queue),
        errors=errors,
        tokens=tokens,
        seconds=round(elapsed, 2),
        tokens_per_second=round(tokens / elapsed, 1),
        ttft_p50_ms=round(statistics.median(ttfts) * 1000, 1) if ttfts else float("nan"),
        latency_p50_s=round(statistics.median(ordered), 2),
        latency_p95_s=round(ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))], 2),
        peak_rss_mb=round(peak_rss_mb(server.process.pid), 0),
    )


def bench_system(
    system: str,
    server: Server,
    levels: list[int],
    prompts: Prompts,
    per_client: int,
    level_seconds: float = LEVEL_SECONDS,
) -> list[Level]:
    results = []
    for mode in MODES:
        asyncio.run(run_level(server, system, mode, 1, 1, prompts))  # warm up this decoding mode
        for clients in levels:
            # Above 32 clients one request each: 64 streams start and end together, a full batch throughout,
            # and the slowest formats' 64-client levels no longer push the run past 20 minutes (20.8 on a
            # 2-core Zen 4 EPYC with two each).
            per = per_client if clients <= 32 else 1
            requests = max(clients * per, ONE_CLIENT_REQUESTS) if system == "textgen" else max(clients, 2)
            level = asyncio.run(run_level(server, system, mode, clients, requests, prompts, level_seconds))
            print(json.dumps(asdict(level)), flush=True)
            results.append(level)
    return results


DTYPES = ("auto", *(dtype for dtype in SERVED_DTYPES if dtype != "auto"))  # auto first
GPT2_PARAMS = 124_439_808  # GPT2Config(): every weight is read once per decoding step
GPT2_OUTPUT_PARAMS = 50257 * 768  # its output layer (the tied embeddings), int8 in the *-int8head formats
# Bytes a weight, per kernel: float16 is float16-int8head's layers' (FBGEMM's float16 products)
BYTES = {"float32": 4, "float32-packed": 4, "float16": 2, "bfloat16": 2, "int8": 1}


@dataclass(frozen=True)
class Plan:
    """What the run measures of one TEXTGEN_DTYPE: its client levels (none: not run) and why, if fewer."""

    levels: tuple[int, ...]
    why: str = ""
    as_auto: bool = False  # not run: `auto` serves this format, so auto's rows are its figures


def plan_formats(
    dtypes: list[str],
    cpu: CpuInfo,
    levels: list[int],
    other_levels: list[int],
    emulated_levels: list[int],
) -> dict[str, Plan]:
    """Each format's levels on `cpu`: `levels` for `auto` and float32 (the targets compare them), none for the
    format `auto` serves (its server would be auto's), `emulated_levels` for a format this CPU emulates (a
    trap `auto` avoids: one client shows its cost; on issue #12's AVX2 EPYC bfloat16's 32 clients ran at 45
    tok/s, ~3 minutes a level), `other_levels` for the rest."""
    from textgen.model.formats import emulated, serving_dtype

    served = serving_dtype("auto", cpu).dtype
    plans = {}
    for dtype in dtypes:
        if dtype == "auto":
            plans[dtype] = Plan(tuple(levels))
        elif dtype == served and "auto" in dtypes:
            plans[dtype] = Plan((), "the format `auto` serves on this CPU: its figures are auto's", True)
        elif emulated(dtype, cpu):
            plans[dtype] = Plan(
                tuple(emulated_levels),
                f"emulated on this CPU ({cpu.isa_class}), so `auto` "
                "never serves it: one client shows what choosing it costs",
            )
        else:
            plans[dtype] = Plan(tuple(levels if dtype == "float32" else other_levels))
    return plans


def client_counts(text: str) -> list[int]:
    """Client counts from a comma-separated list ("1,8,32"); none from an empty one."""
    return [int(x) for x in text.split(",") if x.strip()]


class Phases:
    """Seconds per part of the run, each part timed from the end of the one before: where the time goes."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._mark = time.perf_counter()

    def done(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = round(self.seconds.get(name, 0.0) + now - self._mark, 1)
        self._mark = now


def run_minutes(report: dict[str, Any]) -> str:
    """The run's duration, where it went, and how much of it a second run on this machine would not pay."""
    if report.get("seconds") is None:
        return "a time not recorded"
    text = f"{report['seconds'] / 60:.1f} min"
    phases = report.get("phases")
    if phases:
        text += ": " + ", ".join(f"{name} {seconds:.0f} s" for name, seconds in phases.items())
    compiling = targets.compile_seconds(report)
    if compiling >= 1:
        text += (
            f"; the servers waited {compiling:.0f} s for one-time compiles (cached on disk for the next run)"
        )
    return text


def probe_now(threads: int) -> dict[str, Any]:
    """Bandwidth over GPT-2-sized weights and GEMM peak, per format, measured now (~7 s; never cached)."""
    from textgen.config import Settings
    from textgen.model import float16_op
    from textgen.model.probe import probe

    # float16's products as the servers run them, built (once) where the servers look for it: their own start
    # then loads it rather than building it beside their warm-up.
    float16_op.prepare(Settings.from_env(os.environ).cache_dir, background=False)
    with tempfile.TemporaryDirectory() as cache_dir:
        # A 1-row product over ~500 MB of float32 (GPT-2's weights): the bytes a float32 step streams.
        return probe(Path(cache_dir), threads, gemv_shape=(30_000, 4096)).to_dict()


def roofline(probes: list[dict[str, Any]], native_bf16: bool) -> dict[str, Any]:
    """What the machine allows on workload W, per format: each rate the fastest of the run's `probes`.

    The host's speed moves within minutes: one probe of a run read memory at 36.1 GB/s, another 20 minutes
    earlier at 62.0 (Zen 4, session 23). A roof is what the machine can do, so its best moment counts; the
    probes are spread over the run (start, between servers, end)."""
    merged = dict(probes[0])
    for rates in ("bandwidth_gbs", "gemm_gflops"):
        names = dict.fromkeys(name for p in probes for name in p[rates])  # in the probes' order
        merged[rates] = {
            n: max((p[rates][n] for p in probes if p[rates].get(n)), default=None) for n in names
        }
    return {"probe": merged, "probes": probes, "formats": roofline_formats(merged, native_bf16)}


def _fastest(rates: dict[str, float | None], dtype: str) -> float | None:
    """The probe's rate for `dtype`: float32 and float32-packed are the same bytes and FLOPs, so both are
    judged against the faster of F.linear's (oneMKL) and oneDNN's packed kernel on this machine."""
    names = ("float32", "float32-packed") if dtype.startswith("float32") else (dtype,)
    return max((rates[n] for n in names if rates.get(n)), default=None)


# Bytes a weight each of the probe's reads streamed, over its GPT-2-sized matrix (probe_now): "read" is the
# faster of two plain sums, of float32 and of bfloat16 weights, counted as the smaller.
READ_BYTES = {"float32": 4, "float32-packed": 4, "float16": 2, "bfloat16": 2, "read": 2, "int8": 1}


def memory_rate(measured: dict[str, Any], per_weight: float) -> float | None:
    """The memory's rate for a step that streams `per_weight` bytes a weight of GPT-2: the fastest that any of
    the probe's reads streamed, a format's 1-row product or a plain sum, among those the caches could not
    serve where the step's reads come from memory. A kernel slower than that is a shortfall of the kernel,
    not a roof: on the Zen 4 VM the sum read 62.9 GB/s one day and 40.3 another, when FBGEMM's int8 product
    streamed 62.0 (sessions 22-23). A read of fewer bytes than the step counts only beyond the last-level
    cache the OS reports: on the AMX Xeon (480 MB reported) int8's product over 123 MB streamed 47-51 GB/s
    while every read of 245 MB and more streamed 27-37 (session 26)."""
    cache, shape = measured.get("l3_bytes"), measured.get("gemv_shape")
    weights = shape[0] * shape[1] if shape else 0
    eligible = [
        rate
        for name, rate in measured["bandwidth_gbs"].items()
        if rate
        and (
            cache is None
            or READ_BYTES.get(name, 0) >= per_weight
            or READ_BYTES.get(name, 0) * weights > cache
        )
    ]
    return max(eligible, default=None)


def roofline_formats(measured: dict[str, Any], native_bf16: bool) -> dict[str, dict[str, Any]]:
    """Per format: what the probe's rates allow on workload W."""
    table = {}
    for dtype, size in BYTES.items():
        memory = memory_rate(measured, size)
        product = _fastest(measured["bandwidth_gbs"], dtype)
        # int8 products of 64 rows and more multiply its dense copy, in bfloat16 only where that is native
        # (textgen/model/formats.py int8_dense_dtype), the fastest GEMM here: its compute roofline.
        dense = ("bfloat16" if native_bf16 else "float32") if dtype == "int8" else dtype
        gflops = _fastest(measured["gemm_gflops"], dense)
        if dtype == "float16":  # float32's arithmetic on float16 weights: the machine's float32 peak too
            gflops = max(filter(None, (gflops, _fastest(measured["gemm_gflops"], "float32"))), default=None)
        table[dtype] = {
            "bandwidth_gbps": memory,
            "product_gbps": product,
            "gemm_gflops": gflops,
            # one stream: a step reads every weight once; many streams: 2 FLOP per weight per token
            "memory_tok_s": round(memory * 1e9 / (GPT2_PARAMS * size), 1) if memory else None,
            "compute_tok_s": round(gflops * 1e9 / (2 * GPT2_PARAMS), 1) if gflops else None,
        }
    from textgen.model.formats import INT8_OUTPUT_LAYER  # here, not above: it imports torch

    # bfloat16 or float32 layers and an int8 output layer: a step streams both parts at the memory's rate.
    for dtype in INT8_OUTPUT_LAYER:
        layers = dtype.removesuffix("-int8head")
        step_bytes = (GPT2_PARAMS - GPT2_OUTPUT_PARAMS) * BYTES[layers] + GPT2_OUTPUT_PARAMS
        memory = memory_rate(measured, step_bytes / GPT2_PARAMS)
        if memory:
            table[dtype] = {
                **table[layers],
                "bandwidth_gbps": memory,
                "product_gbps": None,  # two kernels': the layers' and int8's above
                "memory_tok_s": round(memory * 1e9 / step_bytes, 1),
            }
    return table


def markdown(report: dict[str, Any]) -> str:
    cpu, roof = report["cpu"], report["roofline"]["formats"]
    flags = ", ".join(
        f for f in cpu["flags"] if f in ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16")
    )
    if cpu.get("capped"):
        raw = ", ".join(
            f for f in cpu["raw_flags"] if f in ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16")
        )
        lines = [
            f"# Workload W, {cpu['isa_class']} kernels emulated by caps on {cpu['model']} "
            f"({cpu['raw_isa_class']}: {raw}), {report['threads']} threads, {report['date']}",
            "",
            f"Caps: `{' '.join(cpu['caps'])}`, so this process and every server and anchor it started used "
            f"{cpu['isa_class']} kernels ({flags or 'no AVX2'}) on this {cpu['raw_isa_class']} CPU "
            f"(torch capability {cpu['torch_capability']}). " + "; ".join(cpu["notes"]) + ".",
            "",
            "Memory bandwidth is this host's, not that of a CPU of this class: a real AVX2 server's may be "
            "~3x lower (issue #12's AVX2-only EPYC: ~13 GB/s), so its one-stream speeds would be lower; the "
            "kernels and what `auto` chooses are the class's. llama.cpp anchors (if any) were built for "
            "this host's ISA and are not capped.",
            "",
        ]
    else:
        lines = [
            f"# Workload W on {cpu['model']} ({cpu['isa_class']}: {flags}), {report['threads']} threads, "
            f"{report['date']}",
            "",
        ]
    allocators = sorted({str(a) for a in report.get("allocator", {}).values()})
    lines += [
        f"`auto` chose **{report['auto']['dtype']}**: {report['auto']['reason']}",
        "",
        f"The run took {run_minutes(report)}. Setup builds the model and converts the anchors' weights, once "
        "per machine (cached in /tmp/textgen-bench).",
        "",
        f"Servers' memory allocator: {', '.join(allocators) or 'not recorded'} (TEXTGEN_ALLOCATOR).",
        "",
        "## Roofline of this machine (textgen/model/probe.py)",
        "",
        "| format | 1-row product GB/s | roofline GB/s | GEMM GFLOP/s | memory roofline, 1 stream tok/s "
        "| compute roofline tok/s |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for dtype, r in roof.items():
        product = r.get("product_gbps", r["bandwidth_gbps"])  # reports from before the plain read
        parts = f"{dtype.split('-')[0]} + int8"  # an *-int8head format: its layers' kernel and int8's
        lines.append(
            f"| {dtype} | {product or parts} | {r['bandwidth_gbps'] or parts} "
            f"| {r['gemm_gflops']} | {r['memory_tok_s']} | {r['compute_tok_s']} |"
        )
    rates = report["roofline"]["probe"]["bandwidth_gbs"]
    read = rates.get("read")
    if read:
        probes = report["roofline"].get("probes", [])
        reads = [p["bandwidth_gbs"]["read"] for p in probes]
        spread = (
            f" Every rate is the fastest of the run's {len(probes)} probes (start, after the anchors, after each "
            f"server, end; the host's speed moves within minutes): the plain read ranged {min(reads)}-"
            f"{max(reads)} GB/s."
            if len(probes) > 1
            else ""
        )
        streamed = ", ".join(f"{name} {rate}" for name, rate in rates.items() if rate)
        lines += [
            "",
            "Roofline GB/s, per format: the fastest that any of the probe's reads streamed weights from "
            "memory, each format's 1-row product over a GPT-2-sized matrix or a plain read (sum) of it, a "
            "read of fewer bytes than the format's step only if they exceed the reported last-level cache "
            f"(bench/run.py memory_rate). The reads here, GB/s: {streamed}. A product kernel that streams "
            "slower than the roof shows as a shortfall. GEMM: float32 and float32-packed (the same FLOPs) "
            "both take the faster of their kernels, F.linear's (oneMKL) and oneDNN's packed one; float16 "
            "(float32's arithmetic on float16 weights, FBGEMM's) the fastest of its own and theirs." + spread,
        ]
    best: dict[tuple[str, int], float] = {}  # fastest anchor per (decoding, clients)
    for a in report["anchors"]:
        if a.get("tokens_per_second"):
            key = (a["mode"], a["clients"])
            best[key] = max(best.get(key, 0.0), a["tokens_per_second"])
    lines += [
        "",
        "## textgen and the old service (HTTP /generate)",
        "",
        "| system | format | decoding | clients | tok/s | % of roofline | x best anchor | TTFT p50 ms "
        "| errors | peak RSS MiB |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in report["levels"]:
        fmt = r["dtype"].split("=")[-1]  # "auto=bfloat16": the format auto serves
        pct = ratio = ""
        if fmt in roof:
            limit = roof[fmt]["memory_tok_s"] if r["clients"] == 1 else roof[fmt]["compute_tok_s"]
            pct = f"{100 * r['tokens_per_second'] / limit:.0f}%" if limit else ""
        anchor = best.get((r["mode"], r["clients"]))
        if anchor:
            ratio = f"{r['tokens_per_second'] / anchor:.2f}"
        lines.append(
            f"| {r['system']} | {r['dtype']} | {r['mode']} | {r['clients']} | {r['tokens_per_second']} | {pct} | "
            f"{ratio} | "
            f"{r['ttft_p50_ms']} | {r['errors']} | {r['peak_rss_mb']:.0f} |"
        )
    fewer = [f"{dtype}: {plan['why']}" for dtype, plan in report.get("plan", {}).items() if plan["why"]]
    if fewer:
        lines += ["", "Formats measured at fewer levels or not run: " + "; ".join(fewer) + "."]
    lines += [
        "",
        "% of roofline: of the memory roofline at 1 client, of the compute roofline otherwise, for the format",
        "served. x best anchor: against the fastest anchor at the same clients and decoding. Greedy requests",
        "are speculated (TEXTGEN_SPECULATIVE=ngram): a verification step multiplies several rows at once, so",
        "greedy can pass the one-row roofline.",
        "",
        "Ready (from `bentoml serve` to /readyz 200, local model): "
        + ", ".join(f"{d} {s} s" for d, s in report.get("ready_seconds", {}).items()),
        "",
        "A lone stream's compiled step (TEXTGEN_COMPILE, compiled in the background after ready; measured "
        "after it): " + ", ".join(f"{d}: {s}" for d, s in report.get("compiled_step", {}).items()),
        "",
        "The batch's compiled attention of decoding rows (textgen/model/compiled_attention.py, compiled before "
        "the step where it wins): "
        + ", ".join(f"{d}: {s}" for d, s in report.get("compiled_attention", {}).items()),
        "",
        "## Anchors (bench/anchors.py, in-process, same machine, same run)",
        "",
        "| anchor | decoding | clients | tok/s | TTFT ms | how N clients run |",
        "| --- | --- | ---: | ---: | ---: | --- |",
    ]
    for a in report["anchors"]:
        lines.append(
            f"| {a['anchor']} | {a['mode']} | {a['clients']} | {a.get('tokens_per_second')} | "
            f"{a.get('ttft_ms')} | {a.get('batching', a.get('error', ''))} |"
        )
    paired = report.get("paired")
    if paired:
        lines += [
            "",
            f"## One stream, taking turns with {paired['anchor']} (bench/run.py paired_one_stream)",
            "",
            "`auto`'s server and the fastest anchor at one client (top-p), alternating, each pair within "
            "seconds: the host's drift between the tables above (servers and anchors minutes apart) "
            f"cancels in a pair's ratio. Median ratio: **{paired['median_ratio']}**.",
            "",
            "| pair | textgen tok/s | anchor tok/s | ratio |",
            "| ---: | ---: | ---: | ---: |",
        ]
        for i, r in enumerate(paired["rounds"], 1):
            lines.append(f"| {i} | {r['textgen']} | {r['anchor']} | {r['ratio']} |")
    lines += [
        "",
        "## Issue #12's targets, judged on this run (bench/targets.py)",
        "",
        *targets.markdown(targets.judge(report)),
    ]
    quality = ROOT / "bench" / "results" / "quality.md"
    if quality.is_file():  # written by bench/quality.py on the real SmolLM2: what the speed costs
        lines += ["", "## Quality of the weight formats (bench/quality.py)", "", quality.read_text().strip()]
    return "\n".join(lines) + "\n"


PAIRS = 3  # alternations of textgen and the best anchor at one client


def paired_one_stream(
    server: Server, anchor: dict[str, Any], prompts: Prompts, threads: int, pairs: int = PAIRS
) -> dict[str, Any]:
    """textgen and `anchor` (the fastest anchor's row at one client, top-p) at one client, top-p, taking
    turns `pairs` times: each pair within seconds, so the ratio of a pair is free of the host's drift.
    Measured one after the other (every server, then every anchor), one stream's ratio moved from 0.91 to
    1.17 between sessions on the same Zen 4 VM (sessions 20-22), the host's speed 10-40% apart between
    servers of one run. textgen's server idles while the anchor runs (its own process), and back."""
    from bench.anchors import run_anchors

    bufts = "on" if anchor.get("extra_bufts") else "off"  # as the anchor ran in this run's main rounds
    rounds = []
    for _ in range(pairs):
        ours = asyncio.run(run_level(server, "textgen", "top-p", 1, 2, prompts))
        theirs = run_anchors(
            MODEL_DIR,
            (1,),
            ("top-p",),
            anchors=[anchor["anchor"]],
            threads=threads,
            rounds=1,
            llama_extra_bufts=bufts,
        )[0].get("tokens_per_second")
        ratio = round(ours.tokens_per_second / theirs, 2) if theirs and not ours.errors else None
        rounds.append({"textgen": ours.tokens_per_second, "anchor": theirs, "ratio": ratio})
        print(json.dumps({"paired": anchor["anchor"], **rounds[-1]}), flush=True)
    ratios = [r["ratio"] for r in rounds if r["ratio"] is not None]
    return {
        "anchor": anchor["anchor"],
        "rounds": rounds,
        "median_ratio": round(statistics.median(ratios), 2) if ratios else None,
    }


def best_anchor(anchors: list[dict[str, Any]], mode: str, clients: int) -> dict[str, Any] | None:
    """The row of the fastest anchor at `clients` and `mode` (None when none ran)."""
    rows = [
        a for a in anchors if a["mode"] == mode and a["clients"] == clients and a.get("tokens_per_second")
    ]
    return max(rows, key=lambda a: a["tokens_per_second"], default=None)


def textgen_levels(
    dtype: str,
    levels: list[int],
    prompts: Prompts,
    threads: int,
    per_client: int,
    level_seconds: float,
    cpu: dict[str, Any],
    while_up: Callable[[Server], None] | None = None,
) -> tuple[dict, list]:
    """Workload W's levels on a textgen server of `dtype`; `while_up(server)` runs after them, before the
    server stops."""
    env = {"MODEL_NAME": str(MODEL_DIR), "TEXTGEN_DTYPE": dtype, "TEXTGEN_THREADS": str(threads)}
    started = time.perf_counter()
    with start_process(server_command, env) as server:
        info = httpx.get(f"{server.url}/info", timeout=10).json()
        info["ready_seconds"] = round(time.perf_counter() - started, 1)  # `bentoml serve` to /readyz 200
        # A lone stream's step and the batch's attention compile in the background once the server is
        # ready (textgen/model/compiled.py): measure after them, and say how long they took.
        waited = time.perf_counter()
        while "compiling" in (info.get("compiled_step"), info.get("compiled_attention")):
            time.sleep(0.5)
            now = httpx.get(f"{server.url}/info", timeout=10).json()
            info["compiled_step"], info["compiled_attention"] = (
                now["compiled_step"],
                now["compiled_attention"],
            )
        info["compile_wait_seconds"] = round(time.perf_counter() - waited, 1)
        # The server (a BentoML worker process) must see the same kernel picture as this process, caps
        # included, or its numbers would be filed under the wrong class.
        served = {k: info["cpu"].get(k) for k in ("isa_class", "caps", "torch_capability")}
        if served != {k: cpu.get(k) for k in served}:
            raise SystemExit(f"the {dtype} server runs another CPU picture than this process: {served}")
        results = bench_system("textgen", server, levels, prompts, per_client, level_seconds)
        if while_up is not None:
            while_up(server)
    for r in results:
        r.dtype = dtype if dtype != "auto" else f"auto={info['dtype']}"
    return info, results


def main() -> None:
    stop_on_sigterm()
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtypes", default=",".join(DTYPES))
    parser.add_argument("--levels", default="1,8,32,64", help="clients, for auto and float32")
    parser.add_argument("--other-levels", default="1,32", help="clients, for the other formats")
    parser.add_argument(
        "--emulated-levels", default="1", help="clients, for the formats this CPU emulates (auto avoids them)"
    )
    parser.add_argument(
        "--level-seconds",
        type=float,
        default=LEVEL_SECONDS,
        help="a level sends no new request after this (every client has had one)",
    )
    parser.add_argument(
        "--per-client",
        type=int,
        default=2,
        help="textgen requests per client per level, up to 32 clients (above: one each)",
    )
    parser.add_argument("--skip-anchors", action="store_true")
    parser.add_argument(
        "--anchors", default="", help="comma-separated anchors (bench/anchors.py); all if empty"
    )
    parser.add_argument(
        "--pairs",
        type=int,
        default=PAIRS,
        help="turns of `auto` and the fastest anchor at one client (paired_one_stream); 0: none",
    )
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--render", type=Path, help="only rewrite the .md of this saved .json report")
    args = parser.parse_args()
    if args.render:
        report = json.loads(args.render.read_text())
        old = report["roofline"]
        report["roofline"] = roofline(old.get("probes", [old["probe"]]), report["cpu"]["native_bf16"])
        args.render.write_text(json.dumps(report, indent=1))
        args.render.with_suffix(".md").write_text(markdown(report))
        return
    started = time.perf_counter()  # the whole run, building the model included: what a user waits for
    phases = Phases()
    from bench.anchors import ANCHORS, convert
    from textgen.model.cpu import describe, detect_cpu

    ensure_model()
    prompts = Prompts(PROMPT_TOKENS)
    names = [a.strip() for a in args.anchors.split(",") if a.strip()] or list(ANCHORS)
    for name in [] if args.skip_anchors else names:  # once per machine: run_anchors then finds them cached
        try:
            convert(ANCHORS[name], MODEL_DIR)
        except Exception:  # noqa: BLE001  (run_anchors reports it in the anchor's rows)
            pass
    machine = detect_cpu()
    cpu = describe(machine)
    plans = plan_formats(
        args.dtypes.split(","),
        machine,
        client_counts(args.levels),
        client_counts(args.other_levels),
        client_counts(args.emulated_levels),
    )
    report: dict[str, Any] = {"cpu": cpu, "threads": args.threads, "date": str(dt.date.today())}
    report["plan"] = {dtype: asdict(plan) for dtype, plan in plans.items()}
    print(json.dumps(report["plan"]), flush=True)
    phases.done("setup")
    # Measured in this run, never read from an earlier run's cache: this host's bandwidth moves from day to
    # day (the same VM class), and the targets are % of what the machine does now.
    probes: list[dict[str, Any]] = []

    def probe() -> None:
        probes.append(probe_now(args.threads))
        print(json.dumps(probes[-1]["bandwidth_gbs"]), flush=True)
        phases.done("probes")

    probe()
    # The anchors first: the fastest at one client then takes turns with `auto`'s server (paired_one_stream).
    report["anchors"] = []
    if not args.skip_anchors:
        from bench.anchors import run_anchors

        report["anchors"] = run_anchors(
            MODEL_DIR, (1, 32), tuple(MODES), anchors=names, threads=args.threads, rounds=2
        )
    phases.done("anchors")
    probe()
    paired_with = best_anchor(report["anchors"], "top-p", 1)

    def pair(server: Server) -> None:
        report["paired"] = paired_one_stream(server, paired_with, prompts, args.threads, args.pairs)

    levels: list[Level] = []
    for dtype, plan in plans.items():
        if not plan.levels:
            continue
        pairing = dtype == "auto" and paired_with is not None and args.pairs > 0
        info, results = textgen_levels(
            dtype,
            list(plan.levels),
            prompts,
            args.threads,
            args.per_client,
            args.level_seconds,
            cpu,
            pair if pairing else None,
        )
        report.setdefault("ready_seconds", {})[dtype] = info["ready_seconds"]
        report.setdefault("compile_wait_seconds", {})[dtype] = info["compile_wait_seconds"]
        report.setdefault("compiled_step", {})[dtype] = info.get("compiled_step")
        report.setdefault("compiled_attention", {})[dtype] = info.get("compiled_attention")
        # The worker's memory allocator (textgen/model/allocator.py).
        report.setdefault("allocator", {})[dtype] = info.get("allocator")
        if dtype == "auto":
            report["auto"] = {"dtype": info["dtype"], "reason": info["dtype_reason"]}
            skipped = [d for d, p in plans.items() if p.as_auto]
            if skipped and skipped != [info["dtype"]]:  # the plan left out a format auto does not serve
                raise SystemExit(f"auto's server serves {info['dtype']}, this process expected {skipped[0]}")
        levels += results
        phases.done(f"{dtype}'s server")
        probe()
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
            for level in bench_system("baseline", server, [1], prompts, args.per_client, args.level_seconds):
                level.dtype = "float32"
                levels.append(level)
        phases.done("the old service")
    probe()
    report["phases"] = phases.seconds
    report["roofline"] = roofline(probes, cpu["native_bf16"])
    report["levels"] = [asdict(r) for r in levels]
    report["seconds"] = round(time.perf_counter() - started)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"{dt.date.today()}-{cpu['isa_class']}"
    if cpu.get("capped"):  # another class's kernels on this CPU: say so in the name too
        stem = stem.with_name(f"{stem.name}-capped-on-{cpu['raw_isa_class']}")
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1))
    stem.with_suffix(".md").write_text(markdown(report))
    print(stem.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()

"""Anchors for workload W, measured in the same run and on the same machine as textgen (issue #12).

Workload W: a 32-token prompt, exactly 128 new tokens per request (EOS ignored), greedy and top-p sampling
(temperature 0.7, top_p 0.9), at 1 and 32 concurrent clients, on the random-weight GPT-2 124M that
make_model.py writes. The anchors run that workload in-process, with 2 threads, each in a fresh subprocess
of this script so that its thread pools are clean:

* CTranslate2, int8 and float32 (TransformersConverter). N clients = one generate_batch call of N prompts.
* llama.cpp through llama-cpp-python, q8_0 and f32 GGUF. N clients = N sequences decoded together, one
  llama_batch per step through the low-level bindings (the high-level Llama class is single-sequence);
  1 client is the same loop with one sequence. llama.cpp's AMX kernels for q8_0 segfault on some AMX
  CPUs (llama.cpp issue #20824; this one included): a short probe run decides, and when it crashes the
  anchor runs with use_extra_bufts=False (plain AVX-512 kernels) and says so in its "note".

Throughput is the aggregate of all clients: N * new_tokens / wall time of a round, the median of the
rounds; TTFT is the median, over all requests of all rounds, of the time from the round's start to that
request's first sampled token. Every result carries the CPU it came from (lscpu "Model name" and flags).

Converted models are cached under /tmp/textgen-bench/. The GGUF files come from llama.cpp's
convert_hf_to_gguf.py, which ships only in the llama-cpp-python source distribution (vendor/llama.cpp/):
neither the installed llama_cpp package nor the `gguf` package contains an HF converter. The sdist is
looked up in $LLAMA_CPP_SDIST (a .tar.gz or an extracted folder), then in /tmp/textgen-bench/sdist/, and
otherwise fetched there with `pip download --no-deps --no-binary :all: llama-cpp-python==<installed>`.

    python bench/anchors.py --model /tmp/textgen-bench/gpt2-random --clients 1,32 --json out.json
    python bench/anchors.py --clients 1,4 --new-tokens 8 --rounds 1     # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterable

CACHE = Path("/tmp/textgen-bench")
MODEL_DIR = CACHE / "gpt2-random"
PROMPT_TOKENS, NEW_TOKENS = 32, 128
THREADS = 2
# The same decoding modes as bench/run.py: HF order, temperature first, then the nucleus.
MODES: dict[str, dict[str, float]] = {"top-p": {"temperature": 0.7, "top_p": 0.9}, "greedy": {}}
# The same prompt text as bench/run.py's prompt_of_exactly(), cut to the first n tokens.
PROMPT_TEXT = (
    "The history of computing is a story of people, ideas and machines that changed how we live. " * 8
)
RESULT_PREFIX = "ANCHOR-RESULT "


@dataclass(frozen=True)
class Anchor:
    name: str
    engine: str  # "ctranslate2" or "llama.cpp"
    weights: str  # CTranslate2 quantization / compute type, or GGUF --outtype


ANCHORS: dict[str, Anchor] = {
    a.name: a
    for a in (
        Anchor("CTranslate2 int8", "ctranslate2", "int8"),
        Anchor("CTranslate2 float32", "ctranslate2", "float32"),
        Anchor("llama.cpp q8_0", "llama.cpp", "q8_0"),
        Anchor("llama.cpp f32", "llama.cpp", "f32"),
    )
}


# ---------------------------------------------------------------------------------------------------------
# The machine


def cpu_info() -> dict[str, Any]:
    """The CPU as textgen describes it (model, instruction-set class, flags), for every result row."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from textgen.model.cpu import describe

    return describe()


def cpu_line(cpu: dict[str, Any]) -> str:
    """ "model (class: the flags that decide the formats)", for the first line of a result file."""
    flags = ", ".join(f for f in cpu["flags"] if f.startswith(("amx", "avx512_bf16", "avx512f", "avx2")))
    return f"{cpu['model']} ({cpu['isa_class']}: {flags})"


def package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


# ---------------------------------------------------------------------------------------------------------
# Conversions, cached under /tmp/textgen-bench/


def _fresh(target: Path, model_dir: Path) -> bool:
    """The cached conversion exists and is newer than the weights it was made from."""
    weights = [p for p in model_dir.iterdir() if p.suffix in (".safetensors", ".bin")]
    newest = max((p.stat().st_mtime for p in weights), default=0.0)
    return target.exists() and target.stat().st_mtime >= newest


def convert_ct2(model_dir: Path, quantization: str, cache: Path = CACHE) -> Path:
    """The HF model as a CTranslate2 model dir (quantization "int8" or "float32"), converted once."""
    out = cache / f"{model_dir.name}-ct2-{quantization}"
    if _fresh(out / "model.bin", model_dir):
        return out
    from ctranslate2.converters import TransformersConverter

    print(f"converting {model_dir} to CTranslate2 {quantization} in {out}", file=sys.stderr, flush=True)
    TransformersConverter(str(model_dir)).convert(str(out), quantization=quantization, force=True)
    return out


def llama_cpp_sdist(cache: Path = CACHE) -> Path:
    """vendor/llama.cpp of the llama-cpp-python sdist matching the installed version (for the converter)."""
    version = package_version("llama-cpp-python")
    if version is None:
        raise RuntimeError("llama-cpp-python is not installed (pip install -r requirements-bench.txt)")
    candidates: list[Path] = []
    if env := os.environ.get("LLAMA_CPP_SDIST"):
        candidates.append(Path(env))
    sdist_dir = cache / "sdist"
    candidates += [
        sdist_dir / f"llama_cpp_python-{version}",
        sdist_dir / f"llama_cpp_python-{version}.tar.gz",
    ]
    for _ in range(2):
        for candidate in candidates:
            if candidate.is_dir() and (candidate / "vendor/llama.cpp/convert_hf_to_gguf.py").is_file():
                return candidate / "vendor" / "llama.cpp"
            if candidate.is_file() and candidate.name.endswith(".tar.gz"):
                print(f"extracting {candidate} in {sdist_dir}", file=sys.stderr, flush=True)
                sdist_dir.mkdir(parents=True, exist_ok=True)
                with tarfile.open(candidate) as tar:
                    tar.extractall(sdist_dir, filter="data")
                extracted = sdist_dir / candidate.name.removesuffix(".tar.gz")
                if (extracted / "vendor/llama.cpp/convert_hf_to_gguf.py").is_file():
                    return extracted / "vendor" / "llama.cpp"
        print(
            f"llama-cpp-python {version} sdist not found; downloading it to {sdist_dir} "
            "(it holds llama.cpp's convert_hf_to_gguf.py)",
            file=sys.stderr,
            flush=True,
        )
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
        command += [f"llama-cpp-python=={version}", "-d", str(sdist_dir)]
        if subprocess.run(command, stdout=sys.stderr).returncode != 0:
            break
    raise RuntimeError(
        "llama.cpp's convert_hf_to_gguf.py is needed to write the GGUF files and ships only in the "
        f"llama-cpp-python sdist: `pip download --no-deps --no-binary :all: llama-cpp-python=={version} "
        f"-d {sdist_dir}`, or point LLAMA_CPP_SDIST at that .tar.gz or its extracted folder"
    )


def _gguf_staging(model_dir: Path, cache: Path) -> Path:
    """The model dir as convert_hf_to_gguf.py expects it.

    transformers 5 no longer writes GPT-2's legacy `n_ctx` into config.json, and the converter reads it:
    a folder of links to the files, with config.json given n_ctx = n_positions.
    """
    config = json.loads((model_dir / "config.json").read_text())
    if "n_ctx" in config:
        return model_dir
    stage = cache / f"{model_dir.name}-gguf-stage"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    for item in model_dir.iterdir():
        if item.name != "config.json":
            (stage / item.name).symlink_to(item.resolve())
    config["n_ctx"] = config["n_positions"]
    (stage / "config.json").write_text(json.dumps(config, indent=2))
    return stage


def convert_gguf(model_dir: Path, outtype: str, cache: Path = CACHE) -> Path:
    """The HF model as a GGUF file (outtype "f32" or "q8_0"), written once by llama.cpp's converter."""
    out = cache / f"{model_dir.name}-{outtype}.gguf"
    if _fresh(out, model_dir):
        return out
    llama_dir = llama_cpp_sdist(cache)
    source = _gguf_staging(model_dir, cache)
    print(f"converting {model_dir} to GGUF {outtype} in {out}", file=sys.stderr, flush=True)
    partial = out.with_suffix(".partial")
    command = [sys.executable, str(llama_dir / "convert_hf_to_gguf.py"), str(source)]
    command += ["--outtype", outtype, "--outfile", str(partial)]
    run = subprocess.run(command, cwd=llama_dir, capture_output=True, text=True)
    if run.returncode != 0:
        raise RuntimeError(f"convert_hf_to_gguf.py failed:\n{run.stderr[-3000:]}")
    partial.replace(out)
    return out


def convert(anchor: Anchor, model_dir: Path, cache: Path = CACHE) -> Path:
    if anchor.engine == "ctranslate2":
        return convert_ct2(model_dir, anchor.weights, cache)
    return convert_gguf(model_dir, anchor.weights, cache)


def prompt_ids(model_dir: Path, n: int = PROMPT_TOKENS) -> list[int]:
    """The first n token ids of bench/run.py's prompt text, with the model's own tokenizer."""
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(model_dir).encode(PROMPT_TEXT)[:n]
    assert len(ids) == n, f"prompt text is shorter than {n} tokens"
    return ids


# ---------------------------------------------------------------------------------------------------------
# Runners (inside the worker subprocess)


@dataclass
class Round:
    seconds: float
    ttfts: list[float]  # seconds from the round's start to each request's first token
    tokens: list[int]  # new tokens of each request


class Runner:
    engine = ""
    version = ""
    batching = ""

    def run(self, prompt: list[int], clients: int, mode: str, new_tokens: int) -> Round:
        raise NotImplementedError

    def close(self) -> None:
        pass


class CT2Runner(Runner):
    """CTranslate2 Generator: N clients = one generate_batch of N prompts (EOS masked by min_length)."""

    engine = "ctranslate2"

    def __init__(self, path: Path, compute_type: str, threads: int) -> None:
        import ctranslate2

        self.version = f"ctranslate2 {ctranslate2.__version__}"
        self.batching = "one generate_batch call of N prompts"
        self.generator = ctranslate2.Generator(
            str(path), device="cpu", compute_type=compute_type, inter_threads=1, intra_threads=threads
        )
        self.vocabulary: list[str] = json.loads((path / "vocabulary.json").read_text())
        ctranslate2.set_random_seed(0)

    def run(self, prompt: list[int], clients: int, mode: str, new_tokens: int) -> Round:
        tokens = [self.vocabulary[i] for i in prompt]
        options: dict[str, Any] = dict(
            max_length=new_tokens,
            min_length=new_tokens,
            include_prompt_in_result=False,
            beam_size=1,
        )
        if mode == "greedy":
            options.update(sampling_topk=1)
        else:  # topk 0: the whole vocabulary goes to the nucleus, as in HF / textgen
            options.update(
                sampling_topk=0,
                sampling_topp=MODES[mode]["top_p"],
                sampling_temperature=MODES[mode]["temperature"],
            )
        first: list[float] = [0.0] * clients

        def on_token(step: Any) -> bool:
            if step.step == 0:
                first[step.batch_id] = time.perf_counter()
            return False

        start = time.perf_counter()
        results = self.generator.generate_batch([tokens] * clients, callback=on_token, **options)
        seconds = time.perf_counter() - start
        return Round(seconds, [t - start for t in first], [len(r.sequences_ids[0]) for r in results])


class LlamaCppRunner(Runner):
    """llama.cpp through llama-cpp-python's low-level bindings.

    N clients = N sequences in one llama_batch per decode step (the prompts prefilled together in one
    batch, then one token per sequence per step), each sequence in its own KV stream; 1 client is the same
    loop with one sequence. EOS is ignored by never stopping before new_tokens.
    """

    engine = "llama.cpp"

    def __init__(self, path: Path, threads: int, extra_bufts: bool = True) -> None:
        import llama_cpp

        self.ll = llama_cpp
        self.version = f"llama-cpp-python {llama_cpp.__version__}"
        self.batching = "one llama_batch of N sequences per decode step (low-level API)"
        self.threads = threads

        @llama_cpp.llama_log_callback
        def errors_only(level: int, text: bytes, user_data: Any) -> None:
            if level == 4:  # GGML_LOG_LEVEL_ERROR; the load and context chatter stays out of the way
                sys.stderr.write(text.decode(errors="replace"))

        self._log = errors_only  # a reference must outlive every llama.cpp call
        llama_cpp.llama_log_set(self._log, None)
        llama_cpp.llama_backend_init()
        params = llama_cpp.llama_model_default_params()
        params.n_gpu_layers = 0
        # Extra buffer types = weights repacked for AMX (q8_0 on x86) or for the repack kernels (not q8_0
        # nor f32 on x86). Off only when AMX crashes on this machine (see run_anchors).
        params.use_extra_bufts = extra_bufts
        self.model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        self.system_info = llama_cpp.llama_print_system_info().decode().strip()
        self.contexts: dict[tuple[int, int], Any] = {}

    def context(self, clients: int, prompt_tokens: int, new_tokens: int) -> Any:
        """One context per batch size (the warm-up and the rounds share it): llama.cpp's defaults (KV f16,
        one KV stream per sequence, flash attention auto) with room for every sequence, all prompts in
        one llama_decode."""
        ll = self.ll
        per_seq = -(-(prompt_tokens + new_tokens) // 256) * 256
        key = (clients, per_seq)
        if key not in self.contexts:
            for ctx in self.contexts.values():
                ll.llama_free(ctx)
            self.contexts.clear()
            params = ll.llama_context_default_params()
            params.n_ctx = per_seq * clients
            params.n_seq_max = clients
            params.n_batch = max(params.n_batch, clients * prompt_tokens)
            params.n_threads = params.n_threads_batch = self.threads
            params.no_perf = True
            ctx = ll.llama_init_from_model(self.model, params)
            if not ctx:
                raise RuntimeError("llama.cpp could not create a context")
            self.contexts[key] = ctx
        return self.contexts[key]

    def sampler(self, mode: str, seed: int) -> Any:
        ll = self.ll
        chain = ll.llama_sampler_chain_init(ll.llama_sampler_chain_default_params())
        if mode == "greedy":
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_greedy())
        else:  # HF order: temperature, then the nucleus over the whole vocabulary, then draw
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_temp(MODES[mode]["temperature"]))
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_top_p(MODES[mode]["top_p"], 1))
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_dist(seed))
        return chain

    def run(self, prompt: list[int], clients: int, mode: str, new_tokens: int) -> Round:
        ll = self.ll
        ctx = self.context(clients, len(prompt), new_tokens)
        ll.llama_memory_clear(ll.llama_get_memory(ctx), True)
        n_prompt = len(prompt)
        batch = ll.llama_batch_init(max(clients * n_prompt, clients), 0, 1)
        sampler = self.sampler(mode, seed=1234)
        try:

            def fill(entries: Iterable[tuple[int, int, int, bool]]) -> None:
                n = 0
                for token, pos, seq, logits in entries:
                    batch.token[n] = token
                    batch.pos[n] = pos
                    batch.n_seq_id[n] = 1
                    batch.seq_id[n][0] = seq
                    batch.logits[n] = logits
                    n += 1
                batch.n_tokens = n

            start = time.perf_counter()
            fill((tok, j, s, j == n_prompt - 1) for s in range(clients) for j, tok in enumerate(prompt))
            if ll.llama_decode(ctx, batch) != 0:
                raise RuntimeError("llama_decode failed on the prompts")
            # Sampled at each sequence's last prompt token (llama_sampler_sample takes the batch index).
            last = [ll.llama_sampler_sample(sampler, ctx, (s + 1) * n_prompt - 1) for s in range(clients)]
            first = time.perf_counter() - start
            counts = [1] * clients
            for step in range(1, new_tokens):
                fill((last[s], n_prompt + step - 1, s, True) for s in range(clients))
                if ll.llama_decode(ctx, batch) != 0:
                    raise RuntimeError(f"llama_decode failed at step {step}")
                last = [ll.llama_sampler_sample(sampler, ctx, s) for s in range(clients)]
                for s in range(clients):
                    counts[s] += 1
            seconds = time.perf_counter() - start
        finally:
            ll.llama_sampler_free(sampler)
            ll.llama_batch_free(batch)
        return Round(seconds, [first] * clients, counts)

    def close(self) -> None:
        for ctx in self.contexts.values():
            self.ll.llama_free(ctx)
        self.ll.llama_model_free(self.model)


def measure(
    runner: Runner,
    prompt: list[int],
    clients: int,
    mode: str,
    new_tokens: int,
    rounds: int,
) -> dict[str, Any]:
    runner.run(prompt, clients, mode, min(new_tokens, 8))  # warm up this batch size and mode
    done = [runner.run(prompt, clients, mode, new_tokens) for _ in range(rounds)]
    for r in done:
        if any(n != new_tokens for n in r.tokens):
            raise RuntimeError(f"{runner.engine} produced {r.tokens} tokens, not {new_tokens} each")
    rates = [sum(r.tokens) / r.seconds for r in done]
    ttfts = [t for r in done for t in r.ttfts]
    return {
        "tokens_per_second": round(statistics.median(rates), 1),
        "tokens_per_second_min": round(min(rates), 1),
        "tokens_per_second_max": round(max(rates), 1),
        "ttft_ms": round(statistics.median(ttfts) * 1000, 1),
        "seconds": round(statistics.median(r.seconds for r in done), 3),
        "tokens": sum(done[0].tokens),
    }


def worker(spec: dict[str, Any]) -> None:
    """One anchor, all its levels, in this (fresh) process: results on stdout, one line each."""
    anchor = ANCHORS[spec["anchor"]]
    threads = spec["threads"]
    runner: Runner
    if anchor.engine == "ctranslate2":
        runner = CT2Runner(Path(spec["path"]), anchor.weights, threads)
        extra: dict[str, Any] = {"compute_type": anchor.weights}
    else:
        runner = LlamaCppRunner(Path(spec["path"]), threads, spec.get("extra_bufts", True))
        extra = {
            "gguf": anchor.weights,
            "extra_bufts": spec.get("extra_bufts", True),
            "system_info": runner.system_info,
        }
        if spec.get("note"):
            extra["note"] = spec["note"]
    if spec.get("probe"):  # a few tokens at every level: does this configuration run at all?
        for clients in spec["clients"]:
            runner.run(spec["prompt"], clients, "greedy", 2)
        runner.close()
        return
    base = {
        "anchor": anchor.name,
        "engine": anchor.engine,
        "version": runner.version,
        "weights": anchor.weights,
        "threads": threads,
        "prompt_tokens": len(spec["prompt"]),
        "new_tokens": spec["new_tokens"],
        "rounds": spec["rounds"],
        "batching": runner.batching,
        "cpu": spec["cpu"],
        **extra,
    }
    try:
        for mode in spec["modes"]:
            for clients in spec["clients"]:
                # The 1-minute load average before the level: a busy machine shows here, not in the numbers.
                row = {**base, "mode": mode, "clients": clients, "load_avg_1m": round(os.getloadavg()[0], 2)}
                try:
                    row |= measure(runner, spec["prompt"], clients, mode, spec["new_tokens"], spec["rounds"])
                except Exception as error:  # noqa: BLE001 - reported per level, the others still run
                    row |= {"tokens_per_second": None, "ttft_ms": None, "error": repr(error)}
                print(RESULT_PREFIX + json.dumps(row), flush=True)
    finally:
        runner.close()


# ---------------------------------------------------------------------------------------------------------
# The parent: convert, then one subprocess per anchor


def _error_rows(
    anchor: Anchor, clients: list[int], modes: list[str], error: str, cpu: dict[str, Any]
) -> list[dict[str, Any]]:
    return [
        {
            "anchor": anchor.name,
            "engine": anchor.engine,
            "weights": anchor.weights,
            "version": None,
            "mode": mode,
            "clients": n,
            "tokens_per_second": None,
            "ttft_ms": None,
            "cpu": cpu,
            "error": error,
        }
        for mode in modes
        for n in clients
    ]


def _spawn(
    spec: dict[str, Any], threads: int, timeout: float, on_row: Callable[[dict[str, Any]], None]
) -> tuple[int, str]:
    """Run worker(spec) in a fresh interpreter; its result rows go to on_row. (exit code, stderr)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    with tempfile.TemporaryFile("w+") as errors:
        proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=errors, text=True)
        killer = threading.Timer(timeout, proc.kill)  # bounded: a stuck anchor cannot hold the run
        killer.start()
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                if line.startswith(RESULT_PREFIX):
                    on_row(json.loads(line[len(RESULT_PREFIX) :]))
            proc.wait()
        finally:
            killer.cancel()
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        errors.seek(0)
        return proc.returncode, errors.read()


def run_anchors(
    model_dir: Path | str = MODEL_DIR,
    clients: Iterable[int] = (1, 32),
    modes: Iterable[str] = tuple(MODES),
    *,
    anchors: Iterable[str] = tuple(ANCHORS),
    new_tokens: int = NEW_TOKENS,
    prompt_tokens: int = PROMPT_TOKENS,
    threads: int = THREADS,
    rounds: int = 3,
    timeout: float = 3600,
    llama_extra_bufts: str = "auto",
    on_result: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Workload W on every anchor, each in a fresh subprocess; one dict per (anchor, mode, clients).

    An anchor that cannot run (package missing, conversion failed, worker crashed) gives rows with
    tokens_per_second None and an "error" text instead of stopping the others. llama_extra_bufts "auto"
    probes llama.cpp with its extra buffer types (AMX weights for q8_0) and turns them off if that crashes;
    "on" / "off" force them.
    """
    model_dir = Path(model_dir)
    clients, modes = list(clients), list(modes)
    unknown = [m for m in modes if m not in MODES] + [a for a in anchors if a not in ANCHORS]
    if unknown:
        raise ValueError(f"unknown modes or anchors: {unknown}")
    cpu = cpu_info()
    prompt = prompt_ids(model_dir, prompt_tokens)
    results: list[dict[str, Any]] = []

    def emit(row: dict[str, Any]) -> None:
        results.append(row)
        if on_result:
            on_result(row)

    for name in anchors:
        anchor = ANCHORS[name]
        package = "ctranslate2" if anchor.engine == "ctranslate2" else "llama-cpp-python"
        if package_version(package) is None:
            message = f"{package} is not installed (pip install -r requirements-bench.txt)"
            for row in _error_rows(anchor, clients, modes, message, cpu):
                emit(row)
            continue
        try:
            path = convert(anchor, model_dir)
        except Exception as error:  # noqa: BLE001
            for row in _error_rows(anchor, clients, modes, f"conversion failed: {error}", cpu):
                emit(row)
            continue
        spec = dict(
            anchor=name,
            path=str(path),
            prompt=prompt,
            clients=clients,
            modes=modes,
            new_tokens=new_tokens,
            rounds=rounds,
            threads=threads,
            cpu=cpu,
        )
        if anchor.engine == "llama.cpp" and llama_extra_bufts != "off":
            spec["extra_bufts"] = True
            if llama_extra_bufts == "auto":
                code, stderr = _spawn({**spec, "probe": True}, threads, min(timeout, 600), lambda row: None)
                if code != 0:
                    # llama.cpp's AMX kernels for q8_0 segfault on some AMX CPUs (llama.cpp issue #20824):
                    # the weights then stay in the plain CPU buffer (AVX-512 VNNI kernels).
                    spec["extra_bufts"] = False
                    spec["note"] = (
                        f"with extra buffer types (AMX/repack) the probe exited with {code}; "
                        "measured with use_extra_bufts=False"
                    )
                    print(f"{name}: {spec['note']}", file=sys.stderr, flush=True)
        elif anchor.engine == "llama.cpp":
            spec["extra_bufts"] = False
        seen: set[tuple[str, int]] = set()

        def collect(row: dict[str, Any]) -> None:
            seen.add((row["mode"], row["clients"]))
            emit(row)

        code, stderr = _spawn(spec, threads, timeout, collect)
        if code != 0 and len(seen) == len(clients) * len(modes):
            print(f"{name}: worker exited with {code} after its last result", file=sys.stderr, flush=True)
        elif code != 0 or len(seen) < len(clients) * len(modes):
            message = f"worker exited with {code}: {stderr.strip()[-2000:]}"
            for row in _error_rows(anchor, clients, modes, message, cpu):
                if (row["mode"], row["clients"]) not in seen:
                    emit(row)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, default=MODEL_DIR)
    parser.add_argument("--clients", default="1,32")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--anchors", default=",".join(ANCHORS), help="comma-separated names of ANCHORS")
    parser.add_argument("--new-tokens", type=int, default=NEW_TOKENS)
    parser.add_argument("--prompt-tokens", type=int, default=PROMPT_TOKENS)
    parser.add_argument("--threads", type=int, default=THREADS)
    parser.add_argument("--rounds", type=int, default=3, help="measured rounds per level (after a warm-up)")
    parser.add_argument(
        "--llama-extra-bufts",
        default="auto",
        choices=["auto", "on", "off"],
        help="llama.cpp's AMX/repacked weights: auto = on unless a short probe run crashes",
    )
    parser.add_argument("--json", type=Path, help="also write all results to this file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    # As tests/server.py stop_on_sigterm (this script runs alone, without the repository on its path): a
    # SIGTERM unwinds, so the worker it runs is killed instead of running on.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    if args.worker:
        worker(json.loads(args.worker))
        return
    if not (args.model / "config.json").is_file():
        sys.exit(f"{args.model} has no model: python bench/make_model.py {args.model}")
    results = run_anchors(
        args.model,
        [int(x) for x in args.clients.split(",")],
        args.modes.split(","),
        anchors=[a.strip() for a in args.anchors.split(",")],
        new_tokens=args.new_tokens,
        prompt_tokens=args.prompt_tokens,
        threads=args.threads,
        rounds=args.rounds,
        llama_extra_bufts=args.llama_extra_bufts,
        on_result=lambda row: print(json.dumps(row), flush=True),
    )
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

"""Configuration from environment variables, read once at start-up, with errors that name the variable."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

# auto: chosen for this CPU (textgen/model/formats.py); bfloat16-int8head, float32-int8head: bfloat16 or
# float32 but the output layer int8; float16-int8head: float32-int8head with its layers' weights in float16
# (FBGEMM widens them as it multiplies); float32-packed: float32 with oneDNN's packed products
# (textgen/model/linear.py), not batch-invariant
DTYPES = (
    "float32",
    "float32-packed",
    "float32-int8head",
    "float16-int8head",
    "bfloat16",
    "bfloat16-int8head",
    "int8",
    "auto",
)
# textgen/engine/speculative.py MODES (not imported: no torch here)
SPECULATIVE_MODES = ("off", "ngram", "draft")
# auto: unset request fields take the model's own sampling defaults (textgen/model/sampling_defaults.py);
# textgen: only textgen's own defaults, as before (vLLM's --generation-config auto|vllm).
GENERATION_CONFIGS = ("auto", "textgen")
ALLOCATORS = ("auto", "tcmalloc", "system")  # textgen/model/allocator.py
COMPILE_MODES = ("auto", "off")  # auto: bfloat16 steps of one stream compile (textgen/model/compiled.py)


class ConfigError(ValueError):
    pass


def available_cores(cgroup_root: Path = Path("/sys/fs/cgroup")) -> int:
    """CPUs this process may really use: its affinity, capped by a cgroup CPU quota.

    A container limited to 2 CPUs on a 64-core node still sees 64 cores in its affinity; 64 torch threads
    sharing a 2-CPU quota get throttled into a fraction of single-thread speed.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    quota = _cgroup_cpu_quota(cgroup_root)
    return max(1, min(cores, math.ceil(quota))) if quota else cores


def _cgroup_cpu_quota(root: Path) -> float | None:
    """CPUs allowed by the cgroup (v2 `cpu.max`, or v1 `cpu.cfs_quota_us`/`cpu.cfs_period_us`); None if unlimited."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]  # "max 100000" or "200000 100000"
    except (OSError, ValueError):
        try:
            quota = (root / "cpu" / "cpu.cfs_quota_us").read_text().strip()  # -1: unlimited
            period = (root / "cpu" / "cpu.cfs_period_us").read_text().strip()
        except OSError:
            return None
    try:
        value = int(quota) / int(period)
    except ValueError:  # "max"
        return None
    return value if value > 0 else None


def available_memory(
    cgroup_root: Path = Path("/sys/fs/cgroup"), meminfo: Path = Path("/proc/meminfo")
) -> int | None:
    """Bytes this process could still allocate: the host's MemAvailable, capped by the room left under a
    cgroup memory limit (a container limited to 3 GiB on a 64 GiB node must plan with its 3 GiB). None if
    unknown.
    """
    candidates = []
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                candidates.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    for limit_file, usage_file in (
        ("memory.max", "memory.current"),  # cgroup v2
        ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes"),  # v1
    ):
        try:
            limit = (cgroup_root / limit_file).read_text().strip()
            usage = int((cgroup_root / usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 1 << 60:  # "max", or v1's huge number: no limit
            candidates.append(max(0, int(limit) - usage))
        break
    return min(candidates) if candidates else None


@dataclass(frozen=True)
class Settings:
    model_name: str | None = None  # None: GPT-2, or the offline default when GPT-2 is unavailable
    threads: int = 1
    dtype: str = "auto"
    allocator: str = "auto"  # TEXTGEN_ALLOCATOR: the workers' memory allocator (textgen/model/allocator.py)
    compile: str = "auto"  # TEXTGEN_COMPILE: "off" never compiles a lone stream's pass (model/compiled.py)
    generation_config: str = "auto"  # TEXTGEN_GENERATION_CONFIG
    max_batch_size: int = 32
    max_queue: int = 128  # requests waiting for a batch slot; beyond it, 429
    max_new_tokens: int = 1024
    max_prompt_chars: int = 32_000
    max_words: int = 200
    request_timeout: int = 600
    max_body_bytes: int = 1 << 20
    cors_origins: tuple[str, ...] = ()  # empty: no CORS headers, browsers on other origins are refused
    cache_dir: Path = Path.home() / ".cache" / "textgen"
    # SIGTERM: seconds in-flight requests get to finish (new ones get 503) before the rest are cancelled
    # and the worker exits. Fits, with deploy/'s preStop sleep and a margin, in its terminationGracePeriodSeconds.
    drain_seconds: int = 45
    # Worst-case KV cache tokens the running batch may hold (None: from the memory available at start-up).
    kv_budget_tokens: int | None = None
    max_step_tokens: int = (
        512  # the most tokens one step computes while rows decode; 0: no chunking (engine/chunking.py)
    )
    # Memory for cached prompt-prefix KV (engine/prefix_cache.py); 0: off. Distinct prompts fill it to the
    # limit, on top of everything else: 64 MB holds 1,700 tokens of GPT-2 bfloat16 prefixes (a few templates
    # or system prompts). At 256, random GPT-2 in auto at 64 clients peaked at 1637 MB RSS (Zen 4, session
    # 22), 1406 with the cache empty: over the 1.5 GB a small-model server should stay within.
    prefix_cache_mb: int = 64
    # For tests only (TEXTGEN_TEST_FAULT_PROMPT): engine steps fail for sequences whose prompt contains this
    # text, once they have this many tokens (TEXTGEN_TEST_FAULT_AFTER_TOKENS). Never set it in production.
    test_fault_prompt: str | None = None
    test_fault_after_tokens: int = 0
    # Speculative decoding (textgen/engine/speculative.py): the default for greedy requests that do not choose
    # ("off", "ngram", "draft"), drafts per step, and the most running rows it is used for. Chosen from
    # bench/results/2026-12-03-speculative.md (float32, 2 threads): prompt lookup gained 1.61x at one stream and
    # 1.20x at 8 rows on a copying workload, lost 0.88x at 16 rows, and at worst 0.93x where drafts always fail;
    # k=5 beat 3 and 8.
    speculative: str = "ngram"
    spec_tokens: int = 5
    spec_max_batch: int = 8
    draft_model: str | None = None  # TEXTGEN_DRAFT_MODEL: for "draft"; must share the model's tokenizer
    # TEXTGEN_API_KEY: when set, every route but health and metrics requires `Authorization: Bearer <key>`.
    # Kept out of repr so that logging the settings never leaks it.
    api_key: str | None = field(default=None, repr=False)

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> "Settings":
        def integer(name: str, default: int, low: int, high: int) -> int:
            raw = env.get(name, "").strip()
            if not raw:
                return default
            try:
                value = int(raw)
            except ValueError:
                raise ConfigError(f"{name} must be a whole number, got {raw!r}") from None
            if not low <= value <= high:
                raise ConfigError(f"{name} must be between {low} and {high}, got {value}")
            return value

        dtype = env.get("TEXTGEN_DTYPE", "auto").strip() or "auto"
        if dtype not in DTYPES:
            raise ConfigError(f"TEXTGEN_DTYPE must be one of {', '.join(DTYPES)}, got {dtype!r}")
        generation_config = env.get("TEXTGEN_GENERATION_CONFIG", "auto").strip() or "auto"
        if generation_config not in GENERATION_CONFIGS:
            raise ConfigError(
                f"TEXTGEN_GENERATION_CONFIG must be one of {', '.join(GENERATION_CONFIGS)}, "
                f"got {generation_config!r}"
            )
        allocator = env.get("TEXTGEN_ALLOCATOR", "").strip() or cls.allocator
        if allocator not in ALLOCATORS:
            raise ConfigError(f"TEXTGEN_ALLOCATOR must be one of {', '.join(ALLOCATORS)}, got {allocator!r}")
        compile_steps = env.get("TEXTGEN_COMPILE", "").strip() or cls.compile
        if compile_steps not in COMPILE_MODES:
            raise ConfigError(
                f"TEXTGEN_COMPILE must be one of {', '.join(COMPILE_MODES)}, got {compile_steps!r}"
            )
        cache = env.get("TEXTGEN_CACHE_DIR", "").strip()
        speculative = env.get("TEXTGEN_SPECULATIVE", "").strip() or cls.speculative
        if speculative not in SPECULATIVE_MODES:
            raise ConfigError(
                f"TEXTGEN_SPECULATIVE must be one of {', '.join(SPECULATIVE_MODES)}, got {speculative!r}"
            )
        draft_model = env.get("TEXTGEN_DRAFT_MODEL", "").strip() or None
        if speculative == "draft" and draft_model is None:
            raise ConfigError(
                "TEXTGEN_SPECULATIVE=draft needs TEXTGEN_DRAFT_MODEL (a small model, same tokenizer)"
            )
        return cls(
            model_name=env.get("MODEL_NAME", "").strip() or None,
            threads=integer("TEXTGEN_THREADS", available_cores(), 1, 1024),
            dtype=dtype,
            allocator=allocator,
            compile=compile_steps,
            generation_config=generation_config,
            max_batch_size=integer("TEXTGEN_MAX_BATCH_SIZE", 32, 1, 1024),
            max_queue=integer("TEXTGEN_MAX_QUEUE", 128, 0, 1_000_000),
            max_new_tokens=integer("TEXTGEN_MAX_NEW_TOKENS", 1024, 1, 4096),
            max_prompt_chars=integer("TEXTGEN_MAX_PROMPT_CHARS", 32_000, 1, 10_000_000),
            max_words=integer("TEXTGEN_MAX_WORDS", 200, 0, 1_000_000),
            request_timeout=integer("TEXTGEN_TIMEOUT", 600, 1, 86_400),
            max_body_bytes=integer("TEXTGEN_MAX_BODY_BYTES", 1 << 20, 1024, 1 << 30),
            cors_origins=tuple(
                o.strip() for o in env.get("TEXTGEN_CORS_ORIGINS", "").split(",") if o.strip()
            ),
            cache_dir=Path(cache) if cache else cls.cache_dir,
            drain_seconds=integer("TEXTGEN_DRAIN_SECONDS", 45, 0, 86_400),
            kv_budget_tokens=integer("TEXTGEN_KV_BUDGET_TOKENS", 0, 0, 1 << 40) or None,
            max_step_tokens=integer("TEXTGEN_MAX_STEP_TOKENS", 512, 0, 1 << 20),
            prefix_cache_mb=integer("TEXTGEN_PREFIX_CACHE_MB", 64, 0, 1 << 20),
            test_fault_prompt=env.get("TEXTGEN_TEST_FAULT_PROMPT") or None,
            test_fault_after_tokens=integer("TEXTGEN_TEST_FAULT_AFTER_TOKENS", 0, 0, 1 << 20),
            api_key=env.get("TEXTGEN_API_KEY", "").strip() or None,
            speculative=speculative,
            spec_tokens=integer("TEXTGEN_SPEC_TOKENS", cls.spec_tokens, 1, 32),
            spec_max_batch=integer("TEXTGEN_SPEC_MAX_BATCH", cls.spec_max_batch, 1, 1024),
            draft_model=draft_model,
        )

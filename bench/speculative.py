"""Speculative decoding (prompt lookup) against plain decoding: tokens/s and acceptance, in-process Engine.

Model: random-weight GPT-2 124M (bench/make_model.py, the real GPT-2 vocabulary), so every forward pass costs
exactly what GPT-2's does. Random weights never copy their prompt, so two workloads:

- grounded: the prompt is a ~300-token passage and a question; the answer copies spans of the passage
  (8-20 tokens each, joined by 1-3 tokens found nowhere in it), as extraction and summaries do. The model is
  made to give that answer by adding `--steer` to the logit of the answer's next token at every position
  (a hook on the output layer: the forward pass is GPT-2's, unchanged in cost). The steering stands in for a
  trained model that copies. It follows positions, so client i's prompt starts with i newlines and its
  answer is the script from its token i on: every client copies the same spans, but their boundaries fall
  at different steps, so rows of a batch accept different numbers of drafts, as different requests would.
- shuffled (the worst case): steered like grounded, but the answer is the passage's tokens in random
  order: every token has occurred before, so a draft is found at nearly every step and is nearly always
  wrong; each step pays for verifying k+1 tokens and keeps one.
- random: a prompt of random tokens, the unsteered random model, the default penalties (repetition 1.2,
  no-repeat 2-grams): the output never repeats itself, so drafts are found but rejected: the pure cost.

Clients submit at once and wait for all; tokens/s = tokens generated / wall time, best of `--repeats`.

With `--draft-layers N` the rows are measured again with drafts from a draft model (TEXTGEN_SPECULATIVE=draft):
a random GPT-2 of N layers (6: distilgpt2's shape), in the model's format. On grounded and shuffled it is
steered like the model, so it drafts what the model will say (the acceptance of a perfect draft model: its
best case, and what drafting costs); on random it is left alone, a different random model: its drafts are
rejected (the worst case).

    python bench/speculative.py --dtype float32   # writes bench/results/<date>-speculative.{md,json}
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import random
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.run import MODEL_DIR  # noqa: E402
from textgen.config import Settings  # noqa: E402
from textgen.engine import batch as engine_batch  # noqa: E402
from textgen.engine.core import Engine  # noqa: E402
from textgen.engine.params import SamplingParams  # noqa: E402
from textgen.engine.speculative import load_draft_model  # noqa: E402
from textgen.model.loading import load_model  # noqa: E402
from textgen.model.source import resolve_model  # noqa: E402

PASSAGE = """\
The Aldermoor water project began in the spring of 1987, when the town council approved a budget of 4.2
million pounds to replace the Victorian pipes under the market square. The chief engineer, Margaret Holloway,
proposed a gravity-fed system drawing from the reservoir at Fenwick Hill, eleven kilometres to the north.
Construction was delayed twice: first by a dispute with the landowners at Crane Farm over the route of the
main, and then by the discovery of a Roman bath house beneath Church Street in August 1988. Archaeologists
from the University of Leicester spent fourteen months excavating the site, which yielded more than three
thousand coins, a mosaic floor depicting Neptune, and the remains of a heating system. The pipeline was
finally completed in October 1990, at a total cost of 6.8 million pounds, and it still supplies around
twenty-two thousand households. Holloway later wrote that the bath house was the best thing that ever
happened to the project, because the delay gave the council time to add a second treatment plant at
Bexley Mill, which doubled the capacity of the system and prevented the shortages of the dry summer of 1995.
"""
QUESTION = "\nQuestion: Summarise the history of the Aldermoor water project, citing the passage.\nAnswer:"
GLUE = [" and", " which", " so", " then", " also", ";", " while", " because", " as", " thus"]


def grounded_script(
    tokenizer: Any, new_tokens: int, seed: int = 0, shuffled: bool = False
) -> tuple[list[int], list[int]]:
    """The prompt and an answer of `new_tokens` tokens copying spans of the passage (`shuffled`: its
    tokens in random order)."""
    rng = random.Random(seed)
    passage = tokenizer.encode(PASSAGE)
    prompt = passage + tokenizer.encode(QUESTION)
    if shuffled:
        return prompt, [rng.choice(passage) for _ in range(new_tokens)]
    answer: list[int] = []
    while len(answer) < new_tokens:
        length = rng.randint(8, 20)
        start = rng.randrange(len(passage) - length)
        answer += passage[start : start + length]
        answer += tokenizer.encode("".join(rng.sample(GLUE, rng.randint(1, 3))))
    return prompt, answer[:new_tokens]


class Steering:
    """Adds `strength` to the logit of script[position + 1] at every position the output layer sees.

    Through hooks on Hugging Face's forward, so the engine must decode through it: textgen's own pass
    (textgen/model/native.py) calls no module hooks (with it the hooks never fired, and the "grounded" answers
    were 0.8% on script)."""

    def __init__(self, model: Any, script: list[int], strength: float) -> None:
        self.script = torch.tensor(script + [0] * 2048, dtype=torch.long)
        self.strength = strength
        self.enabled = False
        self.positions: torch.Tensor | None = None
        model.register_forward_pre_hook(self._capture, with_kwargs=True)
        model.get_output_embeddings().register_forward_hook(self._steer)

    def _capture(self, module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        self.positions = kwargs.get("position_ids")

    def _steer(self, module: Any, args: Any, logits: torch.Tensor) -> torch.Tensor:
        if not self.enabled or self.positions is None:
            return logits
        q = logits.shape[1]
        targets = self.script[self.positions[:, -q:] + 1]  # [B, q]
        return logits.scatter_add(
            2, targets[..., None], torch.full(targets.shape + (1,), self.strength, dtype=logits.dtype)
        )


def run(engine: Engine, prompts: list[list[int]], params: SamplingParams, clients: int, seed0: int) -> dict:
    observer: Any = engine.observer
    before = observer.drafted, observer.accepted, observer.steps
    start = time.perf_counter()
    seeded = [replace(params, seed=seed0 + i) for i in range(clients)]
    handles = engine.submit_many([(prompts[i], p) for i, p in enumerate(seeded)])
    results = [h.wait(600) for h in handles]
    seconds = time.perf_counter() - start
    drafted, accepted = observer.drafted - before[0], observer.accepted - before[1]
    tokens = sum(r.completion_tokens for r in results)
    return {
        "tok_s": tokens / seconds,
        "tokens": tokens,
        "seconds": seconds,
        "drafted": drafted,
        "accepted": accepted,
        "spec_steps": observer.steps - before[2],
        "texts": [h.sequence.output_ids for h in handles],
    }


def _on_script(outputs: list[list[int]], answer: list[int]) -> float:
    same = sum(a == b for i, out in enumerate(outputs) for a, b in zip(out, answer[i:]))
    return same / max(1, sum(len(out) for out in outputs))


class Counter:
    drafted = accepted = steps = 0

    def on_step(self, *args: Any) -> None:
        pass

    def on_finish(self, result: Any) -> None:
        pass

    def on_failure(self, kind: str) -> None:
        pass

    def on_memory(self, *args: Any) -> None:
        pass

    def on_speculation(self, drafted: int, accepted: int) -> None:
        self.drafted += drafted
        self.accepted += accepted
        self.steps += 1


def draft_dir(layers: int) -> Path:
    """A random GPT-2 of `layers` layers with the model's vocabulary (bench/make_model.py), built once."""
    path = MODEL_DIR.parent / f"gpt2-random-{layers}-layers"
    if not (path / "config.json").is_file():
        make = [sys.executable, str(ROOT / "bench" / "make_model.py"), str(path), "--layers", str(layers)]
        subprocess.run(make + ["--seed", "1"], check=True)
    return path


def cpu_name() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    flags = set(fields.get("Flags", "").split())
    wanted = ["avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8"]
    return f"{fields.get('Model name', platform.processor()).strip()} ({', '.join(f for f in wanted if f in flags)})"


def render(meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    """The results as a markdown table: each speculative row next to its plain twin, with the speed-up."""
    plain = {(r["workload"], r["mode"], r["clients"]): r["tok_s"] for r in rows if r["speculative"] == "off"}
    lines = [
        f"# Speculative decoding on {meta['cpu']}, {meta['threads']} threads, {meta['dtype']}",
        "",
        f"Random-weight GPT-2 124M, real GPT-2 vocabulary, in-process Engine; {meta['prompt_tokens']}-token "
        f"prompt, {meta['new_tokens']} new tokens per client, EOS ignored; clients submit at once; best of "
        f"{meta['repeats']} runs; torch {meta['torch']}. Workloads: see bench/speculative.py (grounded: the "
        f"answer copies 8-20-token spans of the prompt's passage, the model steered to it with "
        f"+{meta['steer']} on the answer token's logit; random: random-token prompt, unsteered model, "
        "default penalties). Sampled: temperature 0.7, top-p 0.9. Drafts from: ngram = prompt lookup; draft = "
        f"a random GPT-2 of {meta.get('draft_layers') or '-'} layers, steered like the model on grounded and "
        "shuffled (a perfect draft model), unsteered on random (a wrong one).",
        "",
        "| workload | decoding | clients | drafts from | k | tok/s off | tok/s speculative | speed-up | acceptance "
        "| tokens/step | drafts/token |",
        "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        if r["speculative"] == "off":
            continue
        base = plain[(r["workload"], r["mode"], r["clients"])]
        acceptance = f"{100 * r['acceptance']:.0f}%" if r["acceptance"] is not None else "no drafts"
        lines.append(
            f"| {r['workload']} | {r['mode']} | {r['clients']} | {r['speculative']} | {r['k']} | {base} | "
            f"{r['tok_s']} | "
            f"{r['tok_s'] / base:.2f}x | {acceptance} | {r['tokens_per_step'] or ''} | "
            f"{r.get('drafted_per_token', '')} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--clients", default="1,4,16")
    parser.add_argument("--spec-tokens", default="5", help="drafts per step; several: a sweep at 1 client")
    parser.add_argument("--steer", type=float, default=12.0)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--workloads", default="grounded,shuffled,random")
    parser.add_argument("--no-backoff", action="store_true", help="speculate at every step (see _record)")
    parser.add_argument("--render", type=Path, default=None, help="only write the .md of this .json")
    parser.add_argument(
        "--draft-layers", type=int, default=0, help="also drafts from a random GPT-2 of N layers"
    )
    args = parser.parse_args()
    if args.render:
        data = json.loads(args.render.read_text())
        args.render.with_suffix(".md").write_text(render(data["meta"], data["rows"]))
        return

    settings = Settings(model_name=str(MODEL_DIR), threads=args.threads, dtype=args.dtype)
    loaded = load_model(settings, resolve_model(settings))
    tokenizer = loaded.tokenizer
    clients = [int(c) for c in args.clients.split(",")]
    prompt, answer = grounded_script(tokenizer, args.new_tokens + max(clients))
    engine_batch.native_decoding = lambda model: None  # Hugging Face's forward, whose hooks steer (Steering)
    steering = Steering(loaded.model, prompt + answer, args.steer)
    _, shuffled = grounded_script(tokenizer, args.new_tokens + max(clients), shuffled=True)
    newline = tokenizer.encode("\n")
    grounded_prompts = [newline * i + prompt for i in range(max(clients))]
    vocab = len(tokenizer)
    rng = random.Random(1)
    random_prompts = [[rng.randrange(vocab - 1) for _ in range(len(prompt))] for _ in range(max(clients))]
    counter = Counter()
    ks = [int(k) for k in args.spec_tokens.split(",")]
    engines = {
        k: Engine(
            loaded.model,
            tokenizer,
            context_length=loaded.context_length,
            observer=counter,
            spec_tokens=k,
            spec_max_batch=max(clients),  # measure every batch size; the default is chosen from the table
        ).start()
        for k in ks
    }
    drafting = {}  # the same, with drafts from the draft model
    if args.draft_layers:
        draft = load_draft_model(str(draft_dir(args.draft_layers)), loaded.model, loaded.context_length)
        draft_steering = Steering(draft, prompt + answer, args.steer)
        drafting = {
            ks[0]: Engine(
                loaded.model,
                tokenizer,
                context_length=loaded.context_length,
                observer=counter,
                speculative="draft",
                draft_model=draft,
                spec_tokens=ks[0],
                spec_max_batch=max(clients),
            ).start()
        }
    for engine in [*engines.values(), *drafting.values()]:
        engine.runner.speculator.backoff = not args.no_backoff  # type: ignore[attr-defined]
    modes = {
        "greedy": dict(temperature=0.0),
        "sampled": dict(temperature=0.7, top_p=0.9),
    }
    workloads: dict[str, tuple[list[list[int]], list[int] | None, dict[str, Any]]] = {
        "grounded": (grounded_prompts, answer, dict(repetition_penalty=1.0, no_repeat_ngram_size=0)),
        "shuffled": (grounded_prompts, shuffled, dict(repetition_penalty=1.0, no_repeat_ngram_size=0)),
        "random": (random_prompts, None, {}),  # unsteered; SamplingParams' default penalties
    }
    rows = []
    warm = SamplingParams(max_new_tokens=8, ignore_eos=True)
    for engine in [*engines.values(), *drafting.values()]:
        engine.submit(prompt, warm).wait(120)
        engine.submit(prompt, replace(warm, speculative=True)).wait(120)
    for workload, (ids, script, penalties) in workloads.items():
        if workload not in args.workloads.split(","):
            continue
        for steer in [steering] + ([draft_steering] if drafting else []):
            steer.enabled = script is not None
            if script is not None:
                steer.script[len(prompt) : len(prompt) + len(script)] = torch.tensor(script)
        for mode, sampling in modes.items():
            base = SamplingParams(max_new_tokens=args.new_tokens, ignore_eos=True, **sampling, **penalties)
            for n in clients:
                for k in ks if n == 1 else ks[:1]:
                    for spec in ("off", "ngram", "draft"):
                        if (spec == "off" and k != ks[0]) or (spec == "draft" and k not in drafting):
                            continue
                        engine = drafting[k] if spec == "draft" else engines[k]
                        params = replace(base, speculative=spec != "off")
                        best = max(
                            (run(engine, ids, params, n, seed0=1000 * r) for r in range(args.repeats)),
                            key=lambda m: m["tok_s"],
                        )
                        row = dict(
                            workload=workload,
                            mode=mode,
                            clients=n,
                            speculative=spec,
                            k=k if spec != "off" else 0,
                            tok_s=round(best["tok_s"], 1),
                            acceptance=(
                                round(best["accepted"] / best["drafted"], 3) if best["drafted"] else None
                            ),
                            tokens_per_step=None,
                            drafted_per_token=round(best["drafted"] / best["tokens"], 2),
                            # Share of the tokens that are the steered answer's (a check of the hook).
                            on_script=(round(_on_script(best["texts"], script), 3) if script else None),
                        )
                        if spec != "off" and best["spec_steps"]:
                            # Per row and verification: its accepted drafts + the model's own token.
                            verified = best["spec_steps"] * n
                            row["tokens_per_step"] = round((best["accepted"] + verified) / verified, 2)
                        rows.append(row)
                        print(json.dumps(row), flush=True)
    for engine in [*engines.values(), *drafting.values()]:
        engine.stop()

    date = datetime.date.today().isoformat()
    out = args.out or ROOT / "bench" / "results" / f"{date}-speculative"
    meta = dict(
        cpu=cpu_name(),
        threads=args.threads,
        dtype=str(loaded.model.dtype).replace("torch.", ""),
        requested_dtype=args.dtype,
        new_tokens=args.new_tokens,
        prompt_tokens=len(prompt),
        steer=args.steer,
        draft_layers=args.draft_layers,
        repeats=args.repeats,
        backoff=not args.no_backoff,
        torch=torch.__version__,
    )
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    out.with_suffix(".md").write_text(render(meta, rows))
    print(f"wrote {out.with_suffix('.json')}")


if __name__ == "__main__":
    main()

"""What bfloat16 and int8 weights (and bfloat16 with an int8 output layer) cost in quality, measured on the
real SmolLM2-135M-Instruct.

Against float32: perplexity on a fixed English text, and greedy agreement on chat prompts (how many of
the first 48 generated tokens match float32's, and how many answers are identical).

    python bench/quality.py            # writes bench/results/quality.md
    python bench/quality.py --formats float32,float16-int8head --out bench/results/quality-avx2.md
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from unittest import mock

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from textgen.model.attention import use_decode_attention  # noqa: E402
from textgen.engine.batch import DecodeBatch  # noqa: E402
from textgen.config import DTYPES, Settings  # noqa: E402
from textgen.engine.core import Engine  # noqa: E402
from textgen.model.loading import load_model  # noqa: E402
from textgen.model.source import resolve_model  # noqa: E402
from textgen.engine.params import SamplingParams  # noqa: E402
from textgen.frontend.templates import render_chat  # noqa: E402
from textgen.model import quantize  # noqa: E402

TEXT = (
    "The Industrial Revolution began in Britain in the late eighteenth century. New machines for spinning and "
    "weaving cotton moved work from homes into factories, and steam engines, first used to pump water out of "
    "mines, soon powered mills, locomotives and ships. Cities grew quickly as people left the countryside to "
    "find work. Wages rose slowly, but working conditions were often harsh: long hours, child labour and "
    "dangerous machinery were common until new laws began to limit them. The changes spread to Europe and "
    "North America during the nineteenth century and transformed how goods were made, how people travelled "
    "and how they lived.\n\n"
    "Plants make their own food through photosynthesis. In their leaves, chlorophyll absorbs sunlight, and the "
    "plant uses that energy to turn water from the soil and carbon dioxide from the air into sugar. Oxygen is "
    "released as a by-product, which is why forests and oceans full of algae matter so much for the air we "
    "breathe. The sugar is either used at once for growth or stored as starch in roots, seeds and fruit, "
    "where animals, including people, find much of their food.\n\n"
    "A computer follows instructions stored in its memory. The processor fetches an instruction, decodes it "
    "and carries it out, billions of times every second. Some instructions add or compare numbers, others "
    "move data between memory and the processor, and others decide which instruction comes next. Programs "
    "written in languages such as Python or C are translated into these simple steps, so that a few basic "
    "operations, repeated very quickly, can display a web page, play music or predict the weather.\n\n"
    "To learn a new language, it helps to practise a little every day rather than a lot once a week. Listen "
    "to people speaking it, read short texts you enjoy, and try to use new words in sentences of your own. "
    "Mistakes are part of the process: most learners understand far more than they can say at first, and "
    "speaking becomes easier with time. Travelling to a country where the language is spoken, or talking "
    "with a friend who speaks it, can make the words feel real and memorable.\n\n"
    "Water boils at one hundred degrees Celsius at sea level, but at lower temperatures high in the "
    "mountains, because the air pressure there is lower. This is why cooking pasta or boiling an egg takes "
    "longer at altitude, and why pressure cookers, which raise the pressure inside the pot, cook food faster. "
    "The same principle explains why a bottle of soda fizzes when it is opened: the drop in pressure lets the "
    "dissolved gas escape as bubbles."
)
PROMPTS = [
    "What is the capital of France?",
    "Explain photosynthesis in one sentence.",
    "Give me three tips for learning a new language.",
    "Who wrote Romeo and Juliet?",
    "What is the boiling point of water at sea level?",
    "Write a haiku about autumn.",
    "What does a CPU do?",
    "Translate 'good morning' into Spanish.",
]
NEW_TOKENS = 48
# Formats with FBGEMM's int8 products measured again with 7-bit weights, as FBGEMM takes them on x86 CPUs
# without AVX512-VNNI (textgen/model/quantize.py weight_levels): row name -> TEXTGEN_DTYPE.
SEVEN_BIT = {
    "int8, 7-bit weights": "int8",
    "float32-int8head, 7-bit weights": "float32-int8head",
    "float16-int8head, 7-bit weights": "float16-int8head",
}


def perplexity(model, tokenizer) -> float:
    ids = torch.tensor([tokenizer.encode(TEXT)])
    with torch.inference_mode():
        loss = model(input_ids=ids, labels=ids).loss
    return float(torch.exp(loss.float()))


def stepwise_perplexity(model, tokenizer) -> float:
    """Perplexity through the serving path: one token per decoding step, as at batch 1.

    This is what int8 weights change: a prompt-sized forward pass uses their dense copy (see
    textgen/model/quantize.py), so `perplexity` alone would not see the int8 kernel at all.
    """
    use_decode_attention(model)
    ids = tokenizer.encode(TEXT)
    with torch.inference_mode():
        batch, logits = DecodeBatch.prefill(model, [None], [ids[:1]], model.config.vocab_size)
        total = 0.0
        for token in ids[1:]:
            total -= float(torch.log_softmax(logits[0], -1)[token])
            batch.record(torch.tensor([token]))
            logits = batch.step(model)
    return float(torch.exp(torch.tensor(total / (len(ids) - 1))))


def greedy_outputs(loaded) -> list[list[int]]:
    engine = Engine(loaded.model, loaded.tokenizer, context_length=loaded.context_length).start()
    params = SamplingParams(
        max_new_tokens=NEW_TOKENS, temperature=0, repetition_penalty=1.0, no_repeat_ngram_size=0
    )
    outputs = []
    for prompt in PROMPTS:
        text = render_chat([{"role": "user", "content": prompt}], loaded.tokenizer).text
        handle = engine.submit(loaded.tokenizer.encode(text, add_special_tokens=False), params)
        handle.wait(300)
        outputs.append(handle.sequence.output_ids)
    engine.stop()
    return outputs


def main() -> None:
    from textgen.model.cpu import describe

    every = [dtype for dtype in DTYPES if dtype != "auto"] + list(SEVEN_BIT)
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--formats", default=",".join(every), help=f"rows to measure, float32 first (default: all of {every})"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "quality.md")
    args = parser.parse_args()
    names = args.formats.split(",")
    if names[0] != "float32" or not set(names) <= set(every):
        parser.error(f"--formats: float32 first, then any of {every}")
    cpu = describe()
    rows = []
    reference: list[list[int]] = []
    for name in names:
        dtype = SEVEN_BIT.get(name, name)
        settings = Settings(model_name=None, threads=2, dtype=dtype)
        # int8 as this CPU's kernels take it; SEVEN_BIT as on x86 CPUs without AVX512-VNNI, which multiply
        # with FBGEMM's AVX2 kernels (oneDNN's output layer is for AMX CPUs: quantize.onednn_output_layer)
        levels = 63 if name in SEVEN_BIT else quantize.weight_levels()
        onednn = name not in SEVEN_BIT and quantize.onednn_output_layer()
        with (
            mock.patch.object(quantize, "weight_levels", lambda: levels),
            mock.patch.object(quantize, "onednn_output_layer", lambda: onednn),
        ):
            loaded = load_model(settings, resolve_model(settings))
        start = time.perf_counter()
        ppl = perplexity(loaded.model, loaded.tokenizer)
        step_ppl = stepwise_perplexity(loaded.model, loaded.tokenizer)
        outputs = greedy_outputs(loaded)
        seconds = time.perf_counter() - start
        if name == "float32":
            reference = outputs
        prefix = [
            next((i for i, (a, b) in enumerate(zip(o, r)) if a != b), min(len(o), len(r)))
            for o, r in zip(outputs, reference)
        ]
        same = sum(o == r for o, r in zip(outputs, reference))
        kept = sum(prefix) / sum(len(r) for r in reference)
        rows.append(
            f"| {name} | {ppl:.2f} | {step_ppl:.2f} | {same}/{len(PROMPTS)} | {kept:.0%} | {seconds:.0f} |"
        )
        print(rows[-1], flush=True)
    report = "\n".join(
        [
            "Quality cost of the weight formats on SmolLM2-135M-Instruct (the offline default), against float32: "
            f"perplexity on a fixed {len(TEXT.split())}-word English text of five paragraphs (in one forward pass, as a prompt "
            "is read, and token by token through the decoding path, as text is generated at batch 1), and greedy "
            f"chat answers to {len(PROMPTS)} prompts ({NEW_TOKENS} tokens, penalties off). int8 means int8 weights "
            "and 8-bit activations quantized per row for products of few rows (decoding steps: fewer than "
            f"{quantize.PACKED_DENSE_ROWS} where the dense copy is bfloat16 packed for oneDNN, else "
            f"{quantize.DENSE_ROWS}), and the weights' dense copy for larger products (prompts, big batches); its "
            "weights are 7-bit on x86 CPUs without AVX512-VNNI (FBGEMM's kernels there add pairs of products "
            "in 16 bits). bfloat16-int8head and float32-int8head are bfloat16 and float32 with the output "
            "layer alone int8 in that way (float32-int8head with no dense copy, every product FBGEMM's "
            "(on AMX CPUs oneDNN's, with FBGEMM's quantization and numbers), and its tied input embeddings "
            "int8 rows too). float16-int8head is float32-int8head with its other layers' weights in float16 "
            "(FBGEMM's float16 products, float32 arithmetic). "
            "float32-packed is float32 with oneDNN's packed products.",
            "",
            f"Measured on {cpu['model']} ({cpu['isa_class']}: {', '.join(cpu['flags'])}), "
            f"torch {torch.__version__}, {time.strftime('%Y-%m-%d')}.",
            "",
            "| weights | perplexity, one pass | perplexity, token by token | answers identical to float32 "
            "| float32 tokens reproduced before the first difference | seconds |",
            "| --- | ---: | ---: | ---: | ---: | ---: |",
            *rows,
        ]
    )
    out = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report + "\n")
    print(report)


if __name__ == "__main__":
    main()

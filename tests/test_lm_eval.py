"""lm-evaluation-harness against a live server, offline, with its default settings.

`local-completions` scores every choice of a multiple-choice task by log-likelihood: it finds the server's
tokenizer through GET /tokenizer_info and POST /tokenize (its remote tokenizer; no Hub), sends prompts as
token ids with `echo`, `logprobs: 1` and `max_tokens: 1`, and sums the prompt log-probabilities of each
continuation. Those sums must equal the same model's, scored in-process with transformers.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

QUESTIONS = [
    {"question": "The capital of France is", "choices": [" Paris", " Rome", " Tokyo"], "answer": 0},
    {"question": "The quick brown fox jumps over the", "choices": [" lazy dog", " moon"], "answer": 0},
    {
        "question": "What is AI? Artificial",
        "choices": [" intelligence", " sweetener", " flowers"],
        "answer": 0,
    },
    {"question": "Language models predict the next", "choices": [" token", " weather"], "answer": 0},
]
MC_TASK = """
task: textgen_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
"""
GEN_TASK = """
task: textgen_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{choices[answer]}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 8
  do_sample: false
metric_list:
  - metric: exact_match
"""


@pytest.fixture(scope="module")
def tasks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("lm-eval-tasks")
    data = folder / "questions.jsonl"
    data.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    (folder / "textgen_mc.yaml").write_text(MC_TASK.format(data=data))
    (folder / "textgen_gen.yaml").write_text(GEN_TASK.format(data=data))
    return folder


def evaluate(tasks: Path, model: str, task: str, **model_args: object) -> dict:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    return simple_evaluate(
        model=model,
        model_args={"model": "tiny-gpt2", "num_concurrent": 1, "max_retries": 1, **model_args},
        tasks=[task],
        task_manager=TaskManager(include_path=str(tasks), include_defaults=False),
        log_samples=True,
        apply_chat_template=model in ("local-chat-completions", "anthropic-chat-completions"),
    )


def score_in_process(model_dir: Path, context: str, continuation: str) -> float:
    """Sum of log P(continuation | context) with transformers, tokenized as lm-eval does."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    n_context = len(tokenizer(context, add_special_tokens=False)["input_ids"])
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([whole])).logits[0].float(), -1)
    return sum(logp[i - 1, whole[i]].item() for i in range(n_context, len(whole)))


def test_local_completions_scores_equal_transformers_in_process(tiny_server, tiny_model_dir, tasks):
    results = evaluate(tasks, "local-completions", "textgen_mc", base_url=f"{tiny_server.url}/v1/completions")
    samples = results["samples"]["textgen_mc"]
    assert len(samples) == len(QUESTIONS)
    correct = 0
    for sample in samples:
        server_scores = [resp[0][0] for resp in sample["resps"]]
        ours = [score_in_process(tiny_model_dir, *args) for args in sample["arguments"]]
        assert server_scores == pytest.approx(ours, abs=1e-3), (sample["arguments"], server_scores, ours)
        correct += int(max(range(len(ours)), key=ours.__getitem__) == sample["target"])
    assert results["results"]["textgen_mc"]["acc,none"] == pytest.approx(correct / len(QUESTIONS))


def test_local_chat_completions_generate_until_runs(tiny_server, tasks):
    results = evaluate(
        tasks,
        "local-chat-completions",
        "textgen_gen",
        base_url=f"{tiny_server.url}/v1/chat/completions",
        tokenizer_backend="remote",
    )
    samples = results["samples"]["textgen_gen"]
    assert len(samples) == len(QUESTIONS) and all(isinstance(s["resps"][0][0], str) for s in samples)
    assert "exact_match,none" in results["results"]["textgen_gen"]


def test_anthropic_chat_completions_answers_as_chat_completions(tiny_server, tasks, monkeypatch):
    """lm-eval's `anthropic-chat-completions` posts Anthropic's Messages bodies (x-api-key, content blocks,
    stop_sequences): greedy, the same answers as through /v1/chat/completions. It drops the task's "\\n"
    stop (Anthropic's API refuses blank stop sequences) and needs an EOS string of its own, so its answers
    run on past the newline where the chat route's stop."""
    monkeypatch.setenv("ANTHROPIC_API_KEY", "unused")
    answers = {}
    for model, path in (
        ("anthropic-chat-completions", "messages"),
        ("local-chat-completions", "chat/completions"),
    ):
        url = f"{tiny_server.url}/v1/{path}"
        results = evaluate(tasks, model, "textgen_gen", base_url=url, eos_string="<|endoftext|>")
        answers[model] = [s["resps"][0][0] for s in results["samples"]["textgen_gen"]]
    assert len(answers["anthropic-chat-completions"]) == len(QUESTIONS)
    assert [a.split("\n")[0] for a in answers["anthropic-chat-completions"]] == answers[
        "local-chat-completions"
    ]

"""One answer's token counts, which every API's `usage` reports under its own names.

The engine counts per sequence (GenerationResult); an answer can be several sequences (OpenAI's `n`, a list
of prompts). Besides prompt and completion tokens:
- cached: prompt tokens served from the prefix cache instead of computed (OpenAI's
  prompt_tokens_details.cached_tokens, the Responses API's input_tokens_details.cached_tokens, Anthropic's
  cache_read_input_tokens);
- reasoning: a thinking model's thought, its tags included (OpenAI's completion_tokens_details and the
  Responses API's output_tokens_details reasoning_tokens); part of the completion tokens;
- a request with a prediction (OpenAI's Predicted Outputs) reports the draft tokens looked up in the
  prediction (and the prompt and output) that the model checked: accepted when it kept them, rejected when
  it did not (completion_tokens_details). Rejected tokens cost a share of a forward pass, not output.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from textgen.engine.outputs import GenerationResult
from textgen.frontend.prepare import Prepared


@dataclass(frozen=True)
class TokenCounts:
    prompt: int
    completion: int
    whole: bool = True  # False: a stream's counts so far, of which only the first two are known
    cached: int = 0
    reasoning: int = 0
    accepted_prediction: int = 0
    rejected_prediction: int = 0

    @property
    def total(self) -> int:
        return self.prompt + self.completion

    @classmethod
    def so_far(cls, prompt: int, completion: int) -> "TokenCounts":
        return cls(prompt, completion, whole=False)

    @classmethod
    def of(cls, prepared: Prepared, results: Sequence[GenerationResult]) -> "TokenCounts":
        """The counts of `results`, the answers to `prepared`'s choices in order (all or the first ones)."""
        # Each prompt counts once however many choices continue it, as OpenAI counts, and so do its cached
        # tokens: those its first choice found.
        first: dict[int, GenerationResult] = {}
        for choice, result in zip(prepared.choices, results):
            first.setdefault(choice.prompt, result)
        predicted = prepared.request.prediction is not None  # else drafts are the server's own speculation
        drafted = sum(r.drafted_tokens for r in results) if predicted else 0
        accepted = sum(r.accepted_draft_tokens for r in results) if predicted else 0
        return cls(
            prompt=sum(len(p) for p in prepared.prompt_ids),
            completion=sum(r.completion_tokens for r in results),
            cached=sum(r.cached_tokens for r in first.values()),
            reasoning=sum(r.reasoning_tokens for r in results),
            accepted_prediction=accepted,
            rejected_prediction=drafted - accepted,
        )

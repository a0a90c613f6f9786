"""The seq2seq runner before the batched one (textgen/engine/seq2seq.py at 18c2c13), kept as the baseline
of bench/seq2seq.py: one request at a time through Hugging Face `generate`, its tokens handed over at the
end. It honours the same parameters, stop strings and events, but neither batches nor streams.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from textgen.engine.params import SamplingParams
from textgen.engine.sampling import subtract_count_penalties
from textgen.engine.sequence import Sequence


class GenerateRunner:
    def __init__(self, model: Any) -> None:
        self.model = model
        self.current: Sequence | None = None

    def kv_bytes(self) -> int:
        return 0  # generate's cache lives and dies inside one call

    @property
    def rows(self) -> list[Sequence]:
        return [self.current] if self.current is not None else []

    def reset(self) -> None:
        self.current = None

    def step(self, new: list[Sequence]) -> int:
        for seq in new:
            self.current = seq
            self._generate(seq)
            self.current = None
        return len(new)

    def _generate(self, seq: Sequence) -> None:
        seq.started = time.perf_counter()
        seq.max_batch_size = 1
        p = seq.params
        kwargs: dict[str, Any] = dict(
            max_new_tokens=seq.max_new_tokens,
            repetition_penalty=p.repetition_penalty,
            no_repeat_ngram_size=p.no_repeat_ngram_size,
            do_sample=not p.greedy,
        )
        if not p.greedy:
            kwargs.update(temperature=p.temperature, top_p=p.top_p, top_k=p.top_k or None)
            if p.min_p > 0:
                kwargs["min_p"] = p.min_p
            torch.manual_seed(seq.seed)  # only the engine thread uses the global generator
        if p.ignore_eos or p.min_tokens:
            kwargs["min_new_tokens"] = (
                seq.max_new_tokens if p.ignore_eos else min(p.min_tokens, seq.max_new_tokens)
            )
        if p.logit_bias:
            kwargs["sequence_bias"] = {(token,): bias for token, bias in p.logit_bias}
        if p.penalizes_counts:
            kwargs["logits_processor"] = LogitsProcessorList([_CountPenalties(p)])
        input_ids = torch.tensor([seq.prompt_ids])
        output = self.model.generate(input_ids=input_ids, **kwargs)[0].tolist()
        start = 1 if output and output[0] == self.model.config.decoder_start_token_id else 0
        for token in output[start:]:
            seq.append(token)
            if seq.finish_reason is not None:
                return
        seq.abort("length")


class _CountPenalties(LogitsProcessor):
    """presence_penalty and frequency_penalty in Hugging Face `generate`, with the batched engine's code."""

    def __init__(self, params: SamplingParams) -> None:
        self.params = params

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        generated = input_ids[0, 1:]  # the decoder's ids after its start token: what was generated so far
        scores = scores.clone()
        subtract_count_penalties(scores, [self.params], [generated.unique(return_counts=True)])
        return scores

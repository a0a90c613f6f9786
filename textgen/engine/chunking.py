"""Chunked prefill: a long prompt is computed a chunk per engine step, between the running rows' tokens.

Without it, a 1000-token prompt is one forward pass during which every running stream waits (on a 2-core
CPU, seconds). With it, each step decodes the running batch and then computes a chunk of the waiting
prompts, sized to cost about as long as the decoding step itself, so a stream's inter-token latency at most
roughly doubles while a long prompt arrives. The size follows the CPU at hand: it comes from the measured
time per decoding step and per prefilled token (moving averages), not from a constant tuned on one machine,
capped by TEXTGEN_MAX_STEP_TOKENS. With nothing decoding, nobody waits: the whole prompt goes at once.
"""

from __future__ import annotations

from dataclasses import dataclass

from textgen.engine.batch import DecodeBatch
from textgen.engine.sequence import Sequence

MIN_CHUNK = 16  # tokens: smaller chunks spend more on per-pass overhead than they save in latency
FIRST_CHUNK = 64  # before any step has been timed
SMOOTHING = 0.2  # weight of the newest timing in the moving averages
SHARE = 0.8  # a chunk aims at this fraction of a decoding step, a margin under the 2x latency it allows


@dataclass
class PromptFill:
    """A prompt being computed across steps, in its own one-row batch: from scratch, or from the KV of a
    cached beginning (textgen/engine/prefix_cache.py)."""

    seq: Sequence
    batch: DecodeBatch

    @property
    def done(self) -> int:
        return self.batch.width  # positions in its cache

    @property
    def remaining(self) -> int:
        return len(self.seq.prompt_ids) - self.done


class ChunkSizer:
    """How many prompt tokens a step may compute while rows are decoding."""

    def __init__(self, max_step_tokens: int) -> None:
        self.max_step_tokens = max_step_tokens
        self.step_seconds: float | None = None  # a decoding step, moving average
        self.token_seconds: float | None = None  # one prefilled token, moving average

    def budget(self, decoding: int) -> int:
        """Prompt tokens for this step, after `decoding` rows got theirs (they count against the cap)."""
        cap = max(MIN_CHUNK, self.max_step_tokens - decoding)
        if self.step_seconds is None or not self.token_seconds:
            return min(cap, FIRST_CHUNK)
        return max(MIN_CHUNK, min(cap, int(SHARE * self.step_seconds / self.token_seconds)))

    def decoded(self, seconds: float) -> None:
        self.step_seconds = _average(self.step_seconds, seconds)

    def prefilled(self, tokens: int, seconds: float) -> None:
        if tokens >= MIN_CHUNK:  # tiny pieces are all overhead: they would make chunks look dear
            self.token_seconds = _average(self.token_seconds, seconds / tokens)


def _average(old: float | None, new: float) -> float:
    return new if old is None else (1 - SMOOTHING) * old + SMOOTHING * new

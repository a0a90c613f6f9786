"""Chunked prefill: a long prompt is computed a chunk per engine step, between the running rows' tokens.

Without it, a 1000-token prompt is one forward pass during which every running stream waits (on a 2-core
CPU, seconds). With it, each step decodes the running batch and computes a chunk of the prompt: in the same
forward pass when the model decodes with textgen's attention (the chunk then adds about SHARED_SHARE of a
step), else in a pass of its own sized to cost about a decoding step. Either way the size follows the CPU at
hand: it comes from measured times (the decoding step's, what the prompt's previous chunks cost or added, a
cost fitted to recent one-row passes; ChunkSizer), not from a constant tuned on one machine, capped by
TEXTGEN_MAX_STEP_TOKENS (0: no chunking). With nothing decoding, nobody waits: every waiting prompt goes at
once.
"""

from __future__ import annotations

import collections
import statistics
import sys
from dataclasses import dataclass

from textgen.engine.batch import DecodeBatch
from textgen.engine.prefix_cache import BLOCK
from textgen.engine.sequence import Sequence

MIN_CHUNK = 16  # tokens: the smallest chunk whatever the timings say
FIRST_CHUNK = 64  # before prefill passes of two different sizes have been timed
SHARE = 0.9  # a chunk's pass aims at this fraction of a decoding step: the step at most about doubles
# A chunk computed in the decoding step's own pass (textgen/engine/causal.py) adds at most about this
# fraction of a step: streams' tokens come about 1.5x further apart while a long prompt is read.
SHARED_SHARE = 0.5
SAMPLES = 32  # recent prefill passes the cost model is fitted to
# "A decoding step" is the median of this many recent ones. A moving average took in the rare slow ones (a KV
# layer outgrowing its buffer, the step after a join: 33-77 ms among 21-22 ms ones; 16 rows, GPT-2 bfloat16,
# 2-core Xeon) and stood at 25.7-35.4 ms when a long prompt arrived: chunks aimed at 1.5x a step made steps
# of 1.65-2x, the chunk's added time being measured against that reference too.
STEP_SAMPLES = 15
# Prompts up to this long are never cut, whatever the timings say: they stay batched together, as
# before chunked prefill, on every CPU (a chunk is computed alone, in a pass of its own).
SHORT_PROMPT = 128
MAX_UNREUSED = 64  # a cached beginning this long is always reused, whatever the timings say


@dataclass
class PromptFill:
    """A prompt being computed across steps, in its own one-row batch: from scratch, or from the KV of a
    cached beginning (textgen/engine/prefix_cache.py)."""

    seq: Sequence
    batch: DecodeBatch
    last: tuple[int, float] | None = None  # its last chunk computed in a pass of its own: (tokens, seconds)
    chunk: int = 0  # its last chunk computed in a decoding step's pass: tokens
    per_token: float | None = None  # what a token of it added to a decoding step's pass, moving average

    def shared(self, tokens: int, added: float) -> None:
        """Its last chunk, `tokens`, was computed in a decoding step's pass and added `added` seconds to it."""
        self.chunk = tokens
        cost = added / tokens
        # Averaged: the time added is a difference of two noisy step times (+-10 ms on a 2-core Xeon).
        self.per_token = cost if self.per_token is None else 0.5 * self.per_token + 0.5 * cost

    @property
    def done(self) -> int:
        return self.batch.width  # positions in its cache

    @property
    def remaining(self) -> int:
        return len(self.seq.prompt_ids) - self.done


class ChunkSizer:
    """How many prompt tokens a step may compute while rows are decoding.

    A prefill pass costs about `fixed + per_token * n`. On a CPU the fixed part, reading every weight once, is
    about a decoding step by itself (2-core Xeon, GPT-2 int8, one row: 1 token 16.3 ms, 16 tokens 27.4, 64
    40.0, 128 63.0), so both are fitted (least squares) to recent one-row passes rather than assumed per
    token; passes of many prompts together cost differently per token and are left out (with them in, the fit
    once put the fixed part at 84 ms). The first chunk of a prompt is what the fit says fits in SHARE of a
    decoding step; each later one is sized from the time its predecessor took (the cost per token grows with
    the depth of the prompt, which every chunk attends over). A chunk is never so small that the fixed part is
    more than a third of its pass: below that, a long prompt would wait many more steps for little gain in
    latency.
    """

    def __init__(self, max_step_tokens: int) -> None:
        self.max_step_tokens = max_step_tokens  # 0: no chunking, a prompt is computed whole
        self.steps: collections.deque[float] = collections.deque(maxlen=STEP_SAMPLES)  # decoding steps' times
        self.passes: collections.deque[tuple[int, float]] = collections.deque(maxlen=SAMPLES)

    def budget(self, decoding: int, last: tuple[int, float] | None = None) -> int:
        """Prompt tokens for this step, after `decoding` rows got theirs (they count against the cap).

        `last`: the (tokens, seconds) of the previous chunk of the prompt this one continues. The next chunk
        is scaled by how far that one was from the time aimed at (at most halved or doubled): with cost
        `fixed + per_token * n` this settles on the aimed time whatever the prompt's depth does to
        `per_token` (it converges at the rate fixed / aimed time).
        """
        cap = self.cap(decoding)
        if cap == sys.maxsize:
            return cap
        cost = self.cost()
        if self.step_seconds is None or (cost is None and last is None):
            return min(cap, FIRST_CHUNK)
        aim = SHARE * self.step_seconds
        if last is not None:
            tokens, seconds = last
            chunk = tokens * min(2.0, max(0.5, aim / seconds))
            if cost is not None and seconds > cost[0]:
                chunk = max(chunk, cost[0] / (2 * (seconds - cost[0]) / tokens))  # the efficiency floor
        else:
            fixed, per_token = cost
            chunk = max((aim - fixed) / per_token, fixed / (2 * per_token))
        return int(max(MIN_CHUNK, min(cap, chunk)))

    def shared_budget(self, decoding: int, fill: PromptFill) -> int:
        """Tokens of `fill` to compute in the decoding step's own pass: what adds SHARED_SHARE of a step at
        the cost per token its previous chunks added (it grows with the prompt's depth). No fixed part to
        pay, so no floor but MIN_CHUNK: the first chunk is that, and a chunk at most doubles the one before
        (a first guess from one-row passes put 49 tokens at 40 ms when 20 ms was aimed at)."""
        cap = self.cap(decoding)
        if cap == sys.maxsize:
            return cap
        if fill.per_token is None or self.step_seconds is None:
            return min(cap, MIN_CHUNK)
        chunk = SHARED_SHARE * self.step_seconds / fill.per_token
        return int(max(MIN_CHUNK, min(cap, 2 * fill.chunk, chunk)))

    def cap(self, decoding: int) -> int:
        """The most prompt tokens one step may compute (TEXTGEN_MAX_STEP_TOKENS, less the decoding rows' own;
        sys.maxsize: no chunking)."""
        if self.max_step_tokens <= 0:
            return sys.maxsize
        return max(MIN_CHUNK, self.max_step_tokens - decoding)

    def worth_reusing(self) -> int:
        """The fewest cached prompt tokens worth a pass of their own: a prompt that starts from the prefix cache
        is computed apart from the others, which costs an extra pass (its fixed part), so a short hit is
        better recomputed with them. Measured on a 2-core Xeon: one or two 16-token hits per 32-token prompt
        taken apart cut workload W from 460 to 370 tok/s."""
        cost = self.cost()
        if cost is None:
            return MAX_UNREUSED
        fixed, per_token = cost
        return max(BLOCK, min(MAX_UNREUSED, int(fixed / per_token)))

    def cost(self) -> tuple[float, float] | None:
        """(fixed seconds, seconds per token) of a prefill pass, fitted to the recent ones; None until passes
        of two different sizes were timed."""
        if len({n for n, _ in self.passes}) < 2:
            return None
        count = len(self.passes)
        mean_n = sum(n for n, _ in self.passes) / count
        mean_t = sum(t for _, t in self.passes) / count
        spread = sum((n - mean_n) ** 2 for n, _ in self.passes)
        slope = sum((n - mean_n) * (t - mean_t) for n, t in self.passes) / spread
        per_token = max(slope, 1e-7)
        return max(0.0, mean_t - per_token * mean_n), per_token

    @property
    def step_seconds(self) -> float | None:
        """A decoding step's time: the median of the recent ones (STEP_SAMPLES); None before any."""
        return statistics.median(self.steps) if self.steps else None

    def decoded(self, seconds: float) -> None:
        self.steps.append(seconds)

    def prefilled(self, tokens: int, seconds: float, rows: int = 1) -> None:
        if rows == 1:
            self.passes.append((tokens, seconds))

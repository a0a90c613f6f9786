"""Choosing the next token of every row of a batch, each row with its own parameters and RNG.

Order: logit_bias, repetition penalty, presence and frequency penalties, banned tokens (n-gram repeats, and
end-of-text before min_tokens), then temperature, min-p, top-k, top-p (vLLM's order; Hugging Face's for the
parameters it shares). Every extra is paid only by the rows that use it: the others are not even indexed.
Sorting a 50257-token vocabulary for top-p costs more than a GPT-2 forward pass at batch 32, so no row
is ever fully sorted, and every pass over [rows, vocab] counts: masks are applied by multiplying with them,
because `masked_fill` and `where` with a boolean mask ran 5x slower than a product here (2.3 ms against 0.43
for 32 rows). With top-k, the candidates are the k likeliest tokens. Without it, a row draws from its whole
distribution and keeps the draw if it is inside the nucleus (the tokens more likely than it weigh less than
top_p): the kept draws are distributed as the nucleus renormalised, and a draw is kept with probability at
least top_p, so from top_p 0.5 up this is what rows do (`sample` on 32 rows as flat as an untrained GPT-2's,
AMX Xeon: 3.7 ms against 9.8 finding the nucleus first; one row 0.23 against 0.58). Below, or after DRAWS
rejected draws, the nucleus is found first: one pass sorts every token into a histogram of log-probability
buckets; the cumulative mass per bucket says which bucket holds the nucleus boundary, and only that bucket's
tokens are ranked. Both give the exact nucleus (up to ties); every draw uses the row's own random generator,
so a seeded request samples the same tokens whatever it is batched with.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import torch

from textgen.engine.params import SamplingParams

BUCKETS = 4096  # histogram resolution: LOG_RANGE / BUCKETS = 0.007 nats per bucket
LOG_RANGE = 30.0  # tokens e^30 times less likely than the best share the lowest bucket (negligible mass)


MIN_DIVISOR = 1e-6  # smallest temperature or repetition penalty used; smaller legal values act like it
DRAW_FROM_TOP_P = 0.5  # rows with top_p from here up sample by drawing and checking (<= 2 draws expected)
DRAWS = 4  # draws a row may have rejected before its nucleus is found first (at top_p 0.5: 1 row in 16)
CDF_BLOCK = 256  # tokens per block of the two-level inverse CDF (_inverse_cdf)
# From this many rows up: below, its extra small operations cost what the cumsum saves (Zen 4, `sample` of
# GPT-2's vocabulary at top-p 0.9: 1 row 0.38 against 0.34 ms, 4 rows 0.61 against 0.61, 8 rows 0.98 against
# 1.03, 32 rows 2.9 against 4.5-5.3 with the old likelier-mass product).
TWO_LEVEL_ROWS = 8


def apply_penalties(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    seen: torch.Tensor,
    banned: Sequence[Collection[int]],
    counts: Sequence[tuple[torch.Tensor, torch.Tensor] | None] | None = None,
    ends: Collection[int] = (),
) -> torch.Tensor:
    """logit_bias; repetition penalty on tokens already present but the `ends` (end-of-text, stop tokens);
    presence and frequency penalties on tokens generated so far (`counts[row]`: the row's generated ids and
    their counts, None for rows without those penalties); -inf on `banned` tokens (those that would repeat
    an n-gram, end-of-text before min_tokens).

    Ending the text is not repeating it: a chat template writes its end-of-turn token after every message,
    so a prompt that counts for the penalty made the offline default's chat answers (repetition_penalty
    1.2) run on to max_tokens instead of ending (Hugging Face and vLLM penalize it as any other token)."""
    _add_logit_bias(logits, params)
    # The floor keeps a legal but vanishing penalty (say 5e-324, which float32 rounds to 0) from
    # dividing by zero: infinite logits would turn the softmax into NaN.
    penalty = torch.tensor([p.repetition_penalty for p in params], dtype=logits.dtype).clamp(min=MIN_DIVISOR)
    if bool((penalty != 1.0).any()):
        # Only the few hundred seen tokens per row change: gather, penalize and put back just those.
        rows, tokens = seen[:, : logits.shape[1]].nonzero(as_tuple=True)
        if ends:
            kept = ~torch.isin(tokens, torch.tensor(sorted(ends), dtype=tokens.dtype))
            rows, tokens = rows[kept], tokens[kept]
        values, factor = logits[rows, tokens], penalty[rows]
        logits[rows, tokens] = torch.where(values > 0, values / factor, values * factor)
    if counts is not None:
        subtract_count_penalties(logits, params, counts)
    for row, tokens in enumerate(banned):
        if tokens:
            logits[row, list(tokens)] = float("-inf")
    return logits


def _add_logit_bias(logits: torch.Tensor, params: Sequence[SamplingParams]) -> None:
    """OpenAI's logit_bias: each listed token's logit += its bias, one scatter for the rows that have one."""
    rows: list[int] = []
    tokens: list[int] = []
    biases: list[float] = []
    width = logits.shape[1]
    for row, p in enumerate(params):
        for token, bias in p.logit_bias:
            if token < width:  # the frontend checked ids against the tokenizer; the model's rows may be fewer
                rows.append(row)
                tokens.append(token)
                biases.append(bias)
    if rows:
        index = (torch.tensor(rows), torch.tensor(tokens))
        logits.index_put_(index, torch.tensor(biases, dtype=logits.dtype), accumulate=True)


def subtract_count_penalties(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    counts: Sequence[tuple[torch.Tensor, torch.Tensor] | None],
) -> None:
    """OpenAI's presence and frequency penalties: logit -= frequency * count + presence * (count > 0).

    `counts[row]`: (distinct token ids, their counts) generated so far by the rows that use the penalties
    (Sequence.token_counts), None for the others; one scatter updates all of them.
    """
    rows = [i for i, c in enumerate(counts) if c is not None and len(c[0])]
    if not rows:
        return
    ids = torch.cat([counts[i][0] for i in rows])  # type: ignore[index]
    count = torch.cat([counts[i][1] for i in rows]).to(logits.dtype)  # type: ignore[index]
    sizes = torch.tensor([len(counts[i][0]) for i in rows])  # type: ignore[index]
    frequency = torch.tensor([params[i].frequency_penalty for i in rows], dtype=logits.dtype)
    presence = torch.tensor([params[i].presence_penalty for i in rows], dtype=logits.dtype)
    penalty = count * frequency.repeat_interleave(sizes) + presence.repeat_interleave(sizes)
    # Each row's ids are distinct, so accumulating is subtracting once per (row, token).
    logits.index_put_((torch.tensor(rows).repeat_interleave(sizes), ids), -penalty, accumulate=True)


def sample(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    rngs: Sequence[torch.Generator],
) -> torch.Tensor:
    """One token per row [B]: argmax for greedy rows, top-k/top-p sampling for the others."""
    if len(params) == 1 and _draws_lone(params[0]):
        return _sample_lone(logits, params[0], rngs[0])
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if len(rows) < len(params):
        tokens = logits.argmax(dim=-1)
        if not rows:
            return tokens
    else:
        tokens = torch.empty(len(params), dtype=torch.long)
    index = torch.tensor(rows)
    if len(rows) < len(params):
        logits = logits[index]
    temperature = torch.tensor([params[i].temperature for i in rows], dtype=logits.dtype).clamp(
        min=MIN_DIVISOR
    )
    scaled = logits / temperature[:, None]
    _apply_min_p(scaled, [params[i].min_p for i in rows])
    top_k = torch.tensor([params[i].top_k for i in rows])
    top_p = torch.tensor([params[i].top_p for i in rows], dtype=logits.dtype)
    tokens[index] = _sample_nucleus(scaled, top_k, top_p, [rngs[i] for i in rows])
    return tokens


def _draws_lone(p: SamplingParams) -> bool:
    """Whether a lone row with these parameters samples in `_sample_lone`: by drawing and checking."""
    return not p.greedy and p.top_k == 0 and p.min_p == 0.0 and p.top_p >= DRAW_FROM_TOP_P


def _sample_lone(logits: torch.Tensor, p: SamplingParams, rng: torch.Generator) -> torch.Tensor:
    """`_sample_top_p` for one row [1, V] without the batch's bookkeeping (its rows' index tensors, lists and
    masks), which a lone stream paid alone: the same passes over the vocabulary and the same draws from the
    row's generator, so the same token as in a batch (tests/test_sampling.py). GPT-2's vocabulary, AMX Xeon,
    2 threads: 0.27 ms against the batch path's 0.51 for one row, ~0.18 of which are passes over it."""
    # The parameters as tensors of the logits' dtype, as `sample` makes them: the same roundings.
    temperature = torch.tensor([p.temperature], dtype=logits.dtype).clamp(min=MIN_DIVISOR)
    top_p = torch.tensor([p.top_p], dtype=logits.dtype)
    scaled = logits / temperature[:, None]
    probs = torch.softmax(scaled, -1)
    cdf = probs.cumsum(-1)  # the whole distribution's: the same for every draw
    for _ in range(DRAWS):
        pick = _search(cdf, _draw([rng], probs.dtype))
        if p.top_p >= 1.0 or bool(_mass_above(probs, probs.gather(1, pick[:, None])) < top_p):
            return pick
    threshold = _nucleus_threshold(scaled, probs, top_p)
    return _inverse_cdf(probs * (probs >= threshold[:, None]), _draw([rng], probs.dtype))


def _apply_min_p(scaled: torch.Tensor, min_p: list[float]) -> None:
    """-inf on each row's tokens less likely than min_p times its likeliest (in place, rows with min_p > 0).

    p >= min_p * p_max is, in logits, scaled >= max + log(min_p): no softmax is needed to find them.
    """
    rows = [i for i, m in enumerate(min_p) if m > 0.0]
    if not rows:
        return
    floor = torch.tensor([min_p[i] for i in rows], dtype=scaled.dtype).log()[:, None]
    if len(rows) == len(scaled):
        part = scaled
    else:
        index = torch.tensor(rows)
        part = scaled[index]
    part.masked_fill_(part < part.amax(-1, keepdim=True) + floor, float("-inf"))
    if len(rows) < len(scaled):
        scaled[index] = part


def _sample_nucleus(
    scaled: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, rngs: Sequence[torch.Generator]
) -> torch.Tensor:
    """Sample each row of temperature-scaled logits within its top-k and top-p."""
    uniform = _draw(rngs, scaled.dtype)
    with_k = top_k > 0
    if bool(with_k.all()):
        return _sample_top_k(torch.softmax(scaled, -1), top_k, top_p, uniform)
    out = torch.empty(len(scaled), dtype=torch.long)
    if bool(with_k.any()):
        out[with_k] = _sample_top_k(
            torch.softmax(scaled[with_k], -1), top_k[with_k], top_p[with_k], uniform[with_k]
        )
        without_k = ~with_k
        rngs = [g for g, k in zip(rngs, with_k.tolist()) if not k]
        scaled, top_p, uniform = scaled[without_k], top_p[without_k], uniform[without_k]
    else:
        without_k = slice(None)
    out[without_k] = _sample_top_p(scaled, top_p, uniform, rngs)
    return out


def _sample_top_p(
    scaled: torch.Tensor, top_p: torch.Tensor, uniform: torch.Tensor, rngs: Sequence[torch.Generator]
) -> torch.Tensor:
    """Sample each row within its top-p nucleus: by drawing from the whole row and keeping a draw inside the
    nucleus (rows with top_p >= DRAW_FROM_TOP_P), else, or after DRAWS rejected draws, from the nucleus
    found first (`_nucleus_threshold`)."""
    probs = torch.softmax(scaled, -1)
    out = torch.empty(len(probs), dtype=torch.long)
    pending = (top_p >= DRAW_FROM_TOP_P).nonzero().flatten()
    for _ in range(DRAWS):
        if not len(pending):
            break
        whole = len(pending) == len(probs)  # no copy of every row for the first draw
        rows_probs = probs if whole else probs[pending]
        pick = _inverse_cdf(rows_probs, uniform[pending])
        free = top_p[pending] >= 1.0  # the whole distribution is the nucleus: every draw is inside
        inside = free
        if not bool(free.all()):
            likelier = _mass_above(rows_probs, rows_probs.gather(1, pick[:, None]))
            inside = free | (likelier < top_p[pending])
        out[pending[inside]] = pick[inside]
        pending = pending[~inside]
        if len(pending):  # drawn again, here or below: a number known to land outside is biased
            uniform[pending] = _draw([rngs[i] for i in pending.tolist()], uniform.dtype)
    rest = torch.cat([(top_p < DRAW_FROM_TOP_P).nonzero().flatten(), pending])
    if len(rest):
        probs, rest_p = probs[rest], top_p[rest]
        threshold = _nucleus_threshold(scaled[rest], probs, rest_p)  # top_p < 1 in every row left
        out[rest] = _inverse_cdf(probs * (probs >= threshold[:, None]), uniform[rest])
    return out


def _mass_above(probs: torch.Tensor, floor: torch.Tensor) -> torch.Tensor:
    """Per row, the mass of the probabilities above the row's `floor` [rows, 1]: the sum of p - floor over
    them, plus floor times their count. Every pass stays float32: the same sum as probabilities times a
    boolean mask spent its time converting the mask (32 rows of GPT-2's vocabulary, Zen 4: 0.3 against 2.2
    ms)."""
    above = (probs - floor).clamp_(min=0.0)
    return above.sum(-1) + floor.squeeze(1) * above.sign_().sum(-1)


def _draw(rngs: Sequence[torch.Generator], dtype: torch.dtype) -> torch.Tensor:
    """One uniform number per row, from the row's own generator."""
    return torch.stack([torch.rand((), generator=g, dtype=dtype) for g in rngs])


def _sample_top_k(
    probs: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, uniform: torch.Tensor
) -> torch.Tensor:
    """Top-k, renormalised (as in HF), then top-p over what is left."""
    k_max = min(probs.shape[1], int(top_k.max()))
    cand_p, cand_ids = probs.topk(k_max, dim=-1)  # sorted, largest first
    cand_p = cand_p * (torch.arange(k_max)[None, :] < top_k[:, None])
    before = (cand_p.cumsum(-1) - cand_p) / cand_p.sum(-1, keepdim=True)
    pick = _inverse_cdf(cand_p * (before < top_p[:, None]), uniform)
    return cand_ids.gather(1, pick[:, None]).squeeze(1)


def _nucleus_threshold(scaled: torch.Tensor, probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Per row, the smallest probability inside the top-p nucleus (the tokens to keep are p >= it).

    Every pass over [rows, vocab] costs about as much as reading it from memory, so this makes few:
    bucket the logits, histogram the mass per bucket, rank only the boundary bucket's tokens.
    """
    rows = len(probs)
    high = scaled.amax(-1, keepdim=True)
    # Buckets are uniform in log-probability over LOG_RANGE below the best token (which lands in the top
    # bucket); monotone in p. Truncating to an integer is flooring here: the values are clamped >= 0.
    per_nat = BUCKETS / LOG_RANGE
    bucket = torch.add(BUCKETS - 1 - high * per_nat, scaled, alpha=per_nat).clamp_(0, BUCKETS - 1).long()
    mass = torch.zeros(rows, BUCKETS, dtype=probs.dtype).scatter_add_(1, bucket, probs)
    from_top = mass.flip(-1).cumsum(-1).flip(-1)  # from_top[b] = mass of buckets >= b
    boundary = ((from_top >= top_p[:, None]).sum(-1) - 1).clamp(min=0)  # last bucket reaching top_p
    above = torch.cat([from_top, torch.zeros(rows, 1, dtype=probs.dtype)], 1).gather(1, boundary[:, None] + 1)
    in_bucket = bucket == boundary[:, None]
    count = int(in_bucket.sum(-1).max().clamp(min=1))
    ranked = (probs * in_bucket).topk(count, dim=-1).values  # the boundary bucket's tokens, largest first
    needed = (above + ranked.cumsum(-1) < top_p[:, None]).sum(-1).clamp(max=count - 1)
    return ranked.gather(1, needed[:, None]).squeeze(1)


def _inverse_cdf(weights: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Index drawn from each row of unnormalised `weights`, given one uniform number per row.

    In two levels over a wide row: the block of CDF_BLOCK tokens the draw lands in, from the blocks' sums,
    then the token within that block. A cumulative sum of the whole [rows, vocab] writes it all again; the
    block sums only read it (32 rows of GPT-2's vocabulary, Zen 4: 0.89 ms for the cumsum of a 4.2 ms
    `sample`)."""
    rows, width = weights.shape
    if rows < TWO_LEVEL_ROWS or width <= 4 * CDF_BLOCK:
        return _search(weights.cumsum(-1), uniform)
    whole = width // CDF_BLOCK * CDF_BLOCK
    masses = weights[:, :whole].view(rows, -1, CDF_BLOCK).sum(-1)
    if whole < width:
        masses = torch.cat([masses, weights[:, whole:].sum(-1, keepdim=True)], 1)
    block_cdf = masses.cumsum(-1)
    block = _search(block_cdf, uniform)[:, None]  # one with mass (see _search)
    mass = masses.gather(1, block)
    before = block_cdf.gather(1, block) - mass
    within = ((uniform[:, None] * block_cdf[:, -1:] - before) / mass).clamp_(0.0, 1.0)
    index = block * CDF_BLOCK + torch.arange(CDF_BLOCK)  # the block's tokens [rows, CDF_BLOCK]
    inside = weights.gather(1, index.clamp(max=width - 1)) * (index < width)  # the last block may be short
    return block.squeeze(1) * CDF_BLOCK + _search(inside.cumsum(-1), within.squeeze(1))


def _search(cdf: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Index drawn from each row of an unnormalised cumulative distribution, given one uniform per row in
    [0, 1]. The target stays below the total (u * total may round up to it), so the index found is one where
    the CDF rises: a token with weight, never one after the last (a zero-weight tail)."""
    total = cdf[:, -1]
    target = torch.minimum(uniform * total, torch.nextafter(total, torch.zeros_like(total)))
    pick = torch.searchsorted(cdf, target[:, None], right=True).squeeze(1)
    return pick.clamp(max=cdf.shape[1] - 1)

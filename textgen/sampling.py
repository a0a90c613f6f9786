"""Choosing the next token of every row of a batch, each row with its own parameters and RNG.

Order as in Hugging Face `generate`: repetition penalty, n-gram ban, then temperature, top-k, top-p.
Sorting a 50257-token vocabulary for top-p costs more than a GPT-2 forward pass at batch 32, so no row
is ever fully sorted: the nucleus is read from a small top-k when it lies inside it (peaked, trained
models), and otherwise found by bisecting on the probability threshold (flat distributions). Both give
the exact nucleus; sampling inside it uses the row's own generator, so a seeded request samples the same
tokens whatever it is batched with.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from textgen.params import SamplingParams

CANDIDATES = 256  # top-k read first; the nucleus of a trained model nearly always lies inside it
BISECTION_STEPS = 26  # threshold resolution: max probability / 2**26


def apply_penalties(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    seen: torch.Tensor,
    banned: Sequence[Sequence[int]],
) -> torch.Tensor:
    """Repetition penalty on tokens already present, and -inf on tokens that would repeat an n-gram."""
    penalty = torch.tensor([p.repetition_penalty for p in params], dtype=logits.dtype)
    if bool((penalty != 1.0).any()):
        penalty = penalty[:, None]
        penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
        logits = torch.where(seen[:, : logits.shape[1]], penalized, logits)
    for row, tokens in enumerate(banned):
        if tokens:
            logits[row, list(tokens)] = float("-inf")
    return logits


def sample(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator],
) -> torch.Tensor:
    """One token per row [B]: argmax for greedy rows, top-k/top-p sampling for the others."""
    tokens = logits.argmax(dim=-1)
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if not rows:
        return tokens
    index = torch.tensor(rows)
    temperature = torch.tensor([params[i].temperature for i in rows], dtype=logits.dtype)
    probs = torch.softmax(logits[index] / temperature[:, None], dim=-1)
    top_k = torch.tensor([params[i].top_k for i in rows])
    top_p = torch.tensor([params[i].top_p for i in rows], dtype=probs.dtype)
    uniform = torch.stack([torch.rand((), generator=generators[i], dtype=probs.dtype) for i in rows])
    tokens[index] = _sample_nucleus(probs, top_k, top_p, uniform)
    return tokens


def _sample_nucleus(
    probs: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, uniform: torch.Tensor
) -> torch.Tensor:
    vocab = probs.shape[1]
    k_cap = min(vocab, max(CANDIDATES, int(top_k.max())))
    cand_p, cand_ids = probs.topk(k_cap, dim=-1)  # sorted, largest first
    k = torch.where(top_k > 0, top_k.clamp(max=k_cap), torch.full_like(top_k, vocab))
    in_k = torch.arange(k_cap)[None, :] < k[:, None]
    cand_p = cand_p * in_k
    # After top-k the distribution is renormalised (as in HF); without top-k it is the full softmax.
    total = torch.where(top_k > 0, cand_p.sum(-1), torch.ones_like(top_p))
    before = (cand_p.cumsum(-1) - cand_p) / total[:, None]  # mass of the candidates ahead of each one
    weights = cand_p * (before < top_p[:, None])
    # The nucleus lies inside the candidates if they reach top_p, or if top-k cut the vocabulary anyway.
    inside = (top_k > 0) | (cand_p.sum(-1) >= top_p)
    out = torch.empty(len(probs), dtype=torch.long)
    if bool(inside.any()):
        w = weights[inside]
        pick = _inverse_cdf(w, uniform[inside])
        out[inside] = cand_ids[inside].gather(1, pick[:, None]).squeeze(1)
    outside = ~inside
    if bool(outside.any()):
        p = probs[outside]
        threshold = _nucleus_threshold(p, top_p[outside])
        out[outside] = _inverse_cdf(p * (p >= threshold[:, None]), uniform[outside])
    return out


def _nucleus_threshold(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Largest t (per row) such that the tokens with probability >= t carry at least top_p."""
    low = torch.zeros(len(probs), dtype=probs.dtype)
    high = probs.max(-1).values
    for _ in range(BISECTION_STEPS):
        mid = (low + high) / 2
        enough = (probs * (probs >= mid[:, None])).sum(-1) >= top_p
        low = torch.where(enough, mid, low)
        high = torch.where(enough, high, mid)
    return low


def _inverse_cdf(weights: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Index drawn from each row of unnormalised `weights`, given one uniform number per row."""
    cdf = weights.cumsum(-1)
    target = uniform * cdf[:, -1]
    pick = torch.searchsorted(cdf, target[:, None], right=True).squeeze(1)
    return pick.clamp(max=weights.shape[1] - 1)

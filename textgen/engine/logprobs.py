"""Log-probabilities of tokens: what the model thought of each token it read (prompt) or wrote.

Taken from the model's raw next-token distribution, before temperature, penalties or top-k/top-p touch it
(vLLM's default, "raw logprobs"): a score of the text under the model, the same whatever decoding
parameters the request used. Only rows that ask pay for it: a log-softmax over their rows of logits
(about 0.1 ms per row of GPT-2's 50257 logits), plus, for the prompt, the output layer over every prompt
position instead of the last one.
"""

from __future__ import annotations

import torch

from textgen.engine.outputs import TokenLogprob

MAX_TOP = 20  # OpenAI's bound on top_logprobs / logprobs
PROMPT_CHUNK = 256  # prompt positions turned into log-probabilities at a time (memory: chunk × vocab)


def sampled_logprobs(logits: torch.Tensor, tokens: torch.Tensor, top: list[int]) -> list[TokenLogprob]:
    """For each row of raw `logits` [rows, vocab]: the log-probability of its `tokens[row]` and its top-k."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    chosen = logp.gather(1, tokens.view(-1, 1)).squeeze(1).tolist()
    k = max(top, default=0)
    values, ids = logp.topk(k, dim=-1) if k else (None, None)
    out = []
    for row, (token, lp) in enumerate(zip(tokens.tolist(), chosen)):
        alternatives: tuple[tuple[int, float], ...] = ()
        if top[row] and ids is not None and values is not None:
            alternatives = tuple(zip(ids[row, : top[row]].tolist(), values[row, : top[row]].tolist()))
        out.append(TokenLogprob(token, lp, alternatives))
    return out


def prompt_logprobs(logits: torch.Tensor, prompt_ids: list[int], top: int) -> list[TokenLogprob]:
    """Log-probabilities of a prompt's own tokens from the logits at every position [len(prompt), vocab].

    Position i's logits predict token i + 1; the first token has no prediction (logprob None, as in
    OpenAI's echo).
    """
    out = [TokenLogprob(prompt_ids[0], None)]
    targets = torch.tensor(prompt_ids[1:], dtype=torch.long)
    for start in range(0, len(prompt_ids) - 1, PROMPT_CHUNK):
        chunk = logits[start : start + PROMPT_CHUNK].float()
        rows = targets[start : start + PROMPT_CHUNK]
        out += sampled_logprobs(chunk[: len(rows)], rows, [top] * len(rows))
    return out

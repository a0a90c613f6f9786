"""Structured output: a grammar per request, enforced as a token mask on its row of the batched step.

A constrained row and a free one share every forward pass; only the constrained row's logits are masked to
the tokens its grammar allows next, so its text always parses (unless max_new_tokens cuts it short, which
its finish_reason "length" says). Grammars come from a JSON schema, any JSON object, a regular expression, a
list of choices or a Lark / GBNF grammar, compiled by llguidance (the grammar engine vLLM and llama.cpp use
too) against the model's own tokenizer: masks are computed per token of the vocabulary, so multi-character
tokens that straddle grammar symbols are allowed exactly when some continuation parses.

Cost, measured on an Intel Xeon (family 6 model 167, AVX-512 and AMX, 2 threads) with GPT-2's 50257 tokens:
0.28-0.36 s to index the vocabulary (once, before the first request that asks for structured output), 0.4 ms
to compile a small schema (0.9 for a forced tool call's grammar), and 0.15 to 0.27 ms per constrained row per
step at 8 and 32 rows (+6% and +11% of bfloat16-int8head's eager steps: bench/results/structured.md).
"""

from __future__ import annotations

import functools
import logging
import threading
from typing import Any

import llguidance
import llguidance.hf
import torch
import torch.nn.functional as F

from textgen.engine.json_schema import enforced_schema
from textgen.engine.params import Constraint, ParamError

log = logging.getLogger(__name__)

# Any JSON object: what OpenAI's response_format {"type": "json_object"} promises.
ANY_OBJECT = '{"type": "object"}'
# JSON laid out as json.dumps does it, with no other whitespace: with llguidance's default (any whitespace
# between tokens) the tiny test model spent its whole budget on "\r\n\t" runs, a failure small models share
# (vLLM added `disable_any_whitespace` for it). A schema's own "x-guidance" options still override this.
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def grammar_of(constraint: Constraint) -> str:
    """The constraint as an llguidance grammar (not yet checked against a tokenizer). Kept for the next asks:
    a request's grammar is checked as it is prepared, then built for its guide, and clients tend to send the
    same schema request after request."""
    return _grammar(constraint.kind, constraint.spec)


@functools.lru_cache(maxsize=16)  # a grammar may be as large as its body (up to 1 MB)
def _grammar(kind: str, spec: str) -> str:
    if kind == "json_object":
        return llguidance.LLMatcher.grammar_from_json_schema(ANY_OBJECT, defaults=JSON_LAYOUT)
    if kind == "json_schema":
        return llguidance.LLMatcher.grammar_from_json_schema(enforced_schema(spec), defaults=JSON_LAYOUT)
    if kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(spec)
    if kind == "choice":
        return llguidance.grammar_from("choice", spec)
    return llguidance.grammar_from("grammar", spec)


def schema_problem(schema: str) -> str | None:
    """What is wrong with a JSON schema (as JSON text) for the grammar engine, or None; needs no
    tokenizer."""
    try:
        grammar = _grammar("json_schema", schema)
    except (ValueError, TypeError) as exc:
        return str(exc)
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, None)
    return _one_line(messages) if is_error else None


class Grammars:
    """Compiles constraints against the model's tokenizer, and gives each constrained sequence its Guide."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: set[int]) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size  # the model's logits width: ids the tokenizer lacks are never allowed
        self.eos_token_ids = sorted(eos_token_ids)
        self._indexed: Any = None
        self._unsupported: str | None = None  # why this tokenizer cannot be indexed, once that is known
        self._lock = threading.Lock()

    @property
    def lltokenizer(self) -> Any:
        """The vocabulary as llguidance indexes it, built once (0.25 s for GPT-2 here), when first needed:
        the server builds it in a worker thread before preparing the first request that may ask for
        structured output (Frontend.index_vocabulary_for), so that the event loop is not held up meanwhile.

        Raises ValueError, saying why, for a tokenizer llguidance cannot index (see `unsupported`).
        """
        with self._lock:
            if self._indexed is None and self._unsupported is None:
                try:
                    self._indexed = llguidance.hf.from_tokenizer(
                        self.tokenizer, n_vocab=self.vocab_size, eos_token=self.eos_token_ids or None
                    )
                except ValueError as exc:
                    self._unsupported = _unsupported_tokenizer(self.tokenizer, exc)
                    log.warning("%s; requests that ask for it get a 400", self._unsupported)  # once
            if self._unsupported is not None:
                raise ValueError(self._unsupported)
            return self._indexed

    @property
    def indexed(self) -> bool:
        """Whether the vocabulary was indexed (or found impossible to index) already."""
        return self._indexed is not None or self._unsupported is not None

    def unsupported(self) -> str | None:
        """Why structured output is impossible with this tokenizer, or None when it is possible.

        llguidance computes masks over the bytes each token stands for, which it reads off the tokenizer's
        decoder: byte-level BPE (GPT-2, BART, most causal models) or SentencePiece with byte fallback (Llama).
        T5's tokenizer (SentencePiece with a Metaspace decoder and no byte fallback) is neither, so the T5
        family cannot be constrained whatever its runner; a model's architecture alone never prevents it.
        """
        try:
            self.lltokenizer
        except ValueError as exc:
            return str(exc)
        return None

    def check(self, constraint: Constraint) -> None:
        """Raise ParamError (a 400 naming the field) when the constraint does not compile, or when this
        model's tokenizer cannot be constrained at all."""
        reason = self.unsupported()
        if reason is not None:
            raise ParamError(constraint.field, f"{constraint.field}: {reason}")
        try:
            grammar = grammar_of(constraint)
        except (ValueError, TypeError) as exc:
            raise ParamError(
                constraint.field, f"{constraint.field} is not a valid {_what(constraint)}: {exc}"
            )
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, self.lltokenizer)
        if is_error:
            raise ParamError(
                constraint.field,
                f"{constraint.field} is not a valid {_what(constraint)}: {_one_line(messages)}",
            )

    def guide(self, constraint: Constraint) -> "Guide":
        matcher = llguidance.LLMatcher(self.lltokenizer, grammar_of(constraint), log_level=0)
        if matcher.is_error():  # check() passed, so only a limit reached while building it gets here
            raise ValueError(f"{constraint.field}: {matcher.get_error()}")
        return Guide(matcher, self.vocab_size)


class Guide:
    """One sequence's place in its grammar: which tokens may come next, and the tokens taken so far."""

    def __init__(self, matcher: Any, vocab_size: int) -> None:
        self.matcher = matcher
        self.vocab_size = vocab_size

    def allowed(self, width: int) -> torch.Tensor:
        """[width] bool: the tokens the grammar allows next (none beyond the vocabulary it was built for)."""
        bits = torch.empty((self.vocab_size + 31) // 32, dtype=torch.int32)
        self.matcher.unsafe_compute_mask_ptr(bits.data_ptr(), bits.numel() * 4)
        allowed = ((bits[:, None] >> _BIT) & 1).view(-1)[: min(width, self.vocab_size)].bool()
        return F.pad(allowed, (0, width - len(allowed))) if len(allowed) < width else allowed

    def advance(self, token: int) -> bool:
        """Take the sampled token; True when the grammar is complete and allows nothing more."""
        if not self.matcher.consume_token(token):
            raise ValueError(f"token {token} broke the output's grammar: {self.matcher.get_error()}")
        return self.matcher.is_stopped()


_BIT = torch.arange(32, dtype=torch.int32)


def allowed_tokens(guides: list[Guide | None], width: int) -> list[torch.Tensor | None]:
    """Per row, the [width] bool mask of the tokens its grammar allows next (None: a free row)."""
    return [g.allowed(width) if g is not None else None for g in guides]


def restrict(allowed: list[torch.Tensor | None], masks: list[torch.Tensor | None]) -> None:
    """Per row, in place: only the tokens both its grammar's mask and its own `masks` (allowed_token_ids)
    allow. Where they share none, the grammar's stands: structured output's text must still parse."""
    for row, mask in enumerate(masks):
        if mask is None:
            continue
        grammar = allowed[row]
        both = mask if grammar is None else grammar & mask
        allowed[row] = both if grammar is None or bool(both.any()) else grammar


def lift_dead_bans(banned: list[set[int]], allowed: list[torch.Tensor | None]) -> list[set[int]]:
    """Bans with the grammar first: a guided row whose every allowed token is banned (no_repeat_ngram_size
    forbids the second `", "` of a JSON object, min_tokens forbids the end the grammar demands) loses its bans
    for this step, so that its output still parses. Penalties stay: they never make a logit -inf."""
    lifted = list(banned)
    for i, (tokens, mask) in enumerate(zip(banned, allowed)):
        if mask is not None and tokens:
            ids = torch.tensor([t for t in tokens if t < len(mask)], dtype=torch.long)
            if int(mask.sum()) <= int(mask[ids].sum()):
                lifted[i] = set()
    return lifted


def apply_masks(logits: torch.Tensor, allowed: list[torch.Tensor | None]) -> None:
    """-inf on the tokens each guided row's grammar forbids, in place, row by row: gathering the guided rows
    into one tensor and back cost 0.25 ms a row at 32 rows of GPT-2's vocabulary here, a row's own masking
    0.03 ms."""
    for row, mask in enumerate(allowed):
        if mask is not None:
            logits[row].masked_fill_(~mask, float("-inf"))


def _unsupported_tokenizer(tokenizer: Any, exc: ValueError) -> str:
    """The 400's explanation: what llguidance said, and what it means for this tokenizer."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = type(backend.decoder).__name__ if backend is not None and backend.decoder is not None else None
    detail = _one_line([str(exc)])
    if decoder == "Metaspace":
        detail = (
            "its decoder is Metaspace (SentencePiece without byte fallback, as in T5 and Flan-T5), which "
            f"llguidance cannot read token bytes from ({detail})"
        )
    return (
        f"structured output is not available for this model: its tokenizer ({type(tokenizer).__name__}) "
        f"cannot be indexed by the grammar engine: {detail}"
    )


def _what(constraint: Constraint) -> str:
    return {
        "json_schema": "JSON schema",
        "json_object": "JSON object constraint",
        "regex": "regular expression",
        "choice": "list of choices",
        "grammar": "Lark or GBNF grammar",
    }[constraint.kind]


def _one_line(messages: list[str]) -> str:
    """llguidance's message, on one line and short enough for an error body."""
    text = " ".join((messages[0] if messages else "unknown error").split())
    return text if len(text) <= 300 else text[:297] + "..."

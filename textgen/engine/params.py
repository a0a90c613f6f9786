"""Decoding parameters: one typed object that carries and validates them (vLLM's SamplingParams)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Literal


class ParamError(ValueError):
    """An invalid request parameter; `field` names it so the HTTP layer can point at it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message

    def renamed(self, names: dict[str, str]) -> "ParamError":
        """The same error under the caller's names for fields (`max_tokens` for `max_new_tokens`), in the
        field it names and wherever its message mentions one (`min_tokens` must be at most `max_tokens`):
        whole names only, in one pass ("stop" renamed is not "stopped" renamed, nor a new name renamed
        again)."""
        if not names:
            return self
        ours = re.compile(r"\b(" + "|".join(map(re.escape, sorted(names, key=len, reverse=True))) + r")\b")
        message = ours.sub(lambda found: names[found.group(1)], self.message)
        return ParamError(names.get(self.field, self.field), message)


@dataclass(frozen=True)
class Range:
    """Inclusive bounds of a numeric parameter, with the message users see when they miss it."""

    low: float
    high: float
    low_open: bool = False  # True: `low` itself is not allowed

    def check(self, name: str, value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ParamError(name, f"{name} must be a number in {self}, got {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ParamError(name, f"{name} must be a finite number in {self}, got {value}")
        too_low = value <= self.low if self.low_open else value < self.low
        if too_low or value > self.high:
            raise ParamError(name, f"{name} must be in {self}, got {value}")

    def __str__(self) -> str:
        return f"{'(' if self.low_open else '['}{fmt_number(self.low)}, {fmt_number(self.high)}]"

    def json_schema(self) -> dict[str, float]:
        low_key = "exclusiveMinimum" if self.low_open else "minimum"
        return {low_key: self.low, "maximum": self.high}


def fmt_number(x: float) -> str:
    """1.0 -> '1', 0.5 -> '0.5': bounds as people write them."""
    return str(int(x)) if float(x).is_integer() else str(x)


# The one table of bounds: SamplingParams, the pydantic request models and the OpenAPI document read it.
RANGES: dict[str, Range] = {
    "max_new_tokens": Range(1, 4096),
    "temperature": Range(0.0, 5.0),
    "top_p": Range(0.0, 1.0, low_open=True),
    "top_k": Range(0, 100_000),
    "repetition_penalty": Range(0.0, 10.0, low_open=True),
    "no_repeat_ngram_size": Range(0, 20),
    "seed": Range(0, 2**63 - 1),
    "logprobs": Range(0, 20),
    "prompt_logprobs": Range(0, 20),
    "min_p": Range(0.0, 1.0),
    "min_tokens": Range(0, 4096),
    # OpenAI's bounds for its two penalties; negative values encourage repeats.
    "presence_penalty": Range(-2.0, 2.0),
    "frequency_penalty": Range(-2.0, 2.0),
}
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
MAX_STOP_TOKEN_IDS = 64
MAX_BAD_WORDS = 64  # vLLM's bad_words: each at most MAX_STOP_CHARS characters
LOGIT_BIAS_RANGE = Range(-100.0, 100.0)  # OpenAI's: -100 bans a token, 100 all but forces it
THINKING_BUDGET_RANGE = Range(0, 1 << 20)  # 0: the thought is closed at once
# Entries of one request's logit_bias: each costs a scattered write per step, and no real use (banning
# or favouring a few words' tokens) needs more.
MAX_LOGIT_BIAS = 1024


ConstraintKind = Literal["json_schema", "json_object", "regex", "choice", "grammar"]


@dataclass(frozen=True)
class Constraint:
    """What a request's output must match (structured output, textgen/engine/grammar.py). `spec`: the JSON
    schema as JSON text, the regular expression, the choices as a JSON list of strings, or the Lark / GBNF
    grammar (empty for json_object); `field`: the request field it came from, which errors name."""

    kind: ConstraintKind
    spec: str = ""
    field: str = "response_format"


@dataclass(frozen=True)
class Thinking:
    """How a thinking model's answer holds its thought (`open` ... `close`), for the engine to count its
    tokens and, with `budget`, bound them: a thought that reaches `budget` tokens is closed by forcing
    `close_ids` (the tokens of `close`), and the answer follows (textgen/engine/thinking.py)."""

    open: str  # "<think>"
    close: str  # "</think>"
    close_ids: tuple[int, ...]
    opened: bool  # the prompt opened the thought: the output starts inside it
    budget: int | None = None  # most tokens of thought; None: as many as max_new_tokens allows

    def __post_init__(self) -> None:
        if self.budget is not None:
            THINKING_BUDGET_RANGE.check("thinking_token_budget", self.budget)
        if not self.close_ids:
            raise ValueError(f"{self.close!r} has no tokens to force")


@dataclass(frozen=True)
class SamplingParams:
    """Everything that decides how one request is decoded.

    `temperature == 0` or `do_sample=False` means greedy decoding. `top_k == 0` disables top-k.
    `repetition_penalty == 1` and `no_repeat_ngram_size == 0` disable those penalties, as `min_p`,
    `min_tokens`, `presence_penalty` and `frequency_penalty` at 0 and an empty `logit_bias` do theirs.
    A request without `seed` still gets its own random stream, so its companions in a batch never
    change what it samples.
    """

    max_new_tokens: int | None = 200  # None: as many as the server's limit and the context allow
    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 0
    repetition_penalty: float = 1.2
    no_repeat_ngram_size: int = 2
    do_sample: bool = True
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    # vLLM's: token ids that end the text as end-of-text does (not before min_tokens, but despite
    # ignore_eos), and whether the stop string that ended it is returned with it.
    stop_token_ids: tuple[int, ...] = ()
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True  # vLLM's: False keeps special tokens' text (not end-of-text's)
    ignore_eos: bool = False
    # Whether repetition_penalty and no_repeat_ngram_size count the prompt's tokens (Hugging Face's way). A
    # continuation should not repeat its prompt; an answer must be free to repeat its question's words
    # ("The capital of France is Paris"), so the answering templates turn this off.
    penalize_prompt: bool = True
    logprobs: int | None = None  # None: none; k: each generated token's log-probability and its top k
    prompt_logprobs: int | None = None  # None: none; k: the same for every prompt token (scoring, echo)
    min_p: float = 0.0  # keep only tokens at least min_p times as likely as the likeliest (after temperature)
    min_tokens: int = 0  # neither an end-of-text token nor a stop string ends the text before this many
    # OpenAI's penalties, over the generated tokens only: for every token generated so far (count times),
    # logit -= frequency_penalty * count + presence_penalty.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit) pairs
    constraint: Constraint | None = None  # structured output: the grammar the text must match
    # Speculative decoding (textgen/engine/speculative.py) for this request: None takes the server's
    # TEXTGEN_SPECULATIVE. It never changes greedy output, nor the distribution of sampled output.
    speculative: bool | None = None
    # OpenAI's Predicted Outputs: tokens the output is expected to repeat much of (a file being edited),
    # looked up for speculative drafts beside the prompt's; they turn speculation on unless `speculative`
    # is False. Like every draft, they never change greedy output nor the distribution of sampled output.
    prediction: tuple[int, ...] = ()
    # A thinking model's thought: counted (usage's reasoning tokens) and, with a budget, bounded.
    thinking: Thinking | None = None
    # vLLM's: the only token ids the output may hold (empty: any), and words it must not (`bad_words`, as
    # the client wrote them; `bad_words_ids`, each word's token sequences, filled in by the frontend, which
    # has the tokenizer: the last token of one is banned wherever the output ends with the rest of it).
    allowed_token_ids: tuple[int, ...] = ()
    bad_words: tuple[str, ...] = ()
    bad_words_ids: tuple[tuple[int, ...], ...] = ()

    def __post_init__(self) -> None:
        for name, bounds in RANGES.items():
            value = getattr(self, name)
            if value is not None:
                bounds.check(name, value)
        if len(self.stop) > MAX_STOP_STRINGS:
            raise ParamError(
                "stop",
                f"stop takes at most {MAX_STOP_STRINGS} strings, got {len(self.stop)}",
            )
        for s in self.stop:
            if not isinstance(s, str) or not 1 <= len(s) <= MAX_STOP_CHARS:
                raise ParamError(
                    "stop",
                    f"each stop string must have 1 to {MAX_STOP_CHARS} characters, got {s!r}",
                )
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise ParamError(
                "stop_token_ids",
                f"stop_token_ids takes at most {MAX_STOP_TOKEN_IDS} ids, got {len(self.stop_token_ids)}",
            )
        for token in self.stop_token_ids:
            if isinstance(token, bool) or not isinstance(token, int) or token < 0:
                raise ParamError("stop_token_ids", f"stop_token_ids holds {token!r}, not a token id (>= 0)")
        for token in self.allowed_token_ids:
            if isinstance(token, bool) or not isinstance(token, int) or token < 0:
                raise ParamError(
                    "allowed_token_ids", f"allowed_token_ids holds {token!r}, not a token id (>= 0)"
                )
        if len(self.bad_words) > MAX_BAD_WORDS:
            raise ParamError(
                "bad_words", f"bad_words takes at most {MAX_BAD_WORDS} words, got {len(self.bad_words)}"
            )
        for word in self.bad_words:
            if not isinstance(word, str) or not word.strip() or len(word) > MAX_STOP_CHARS:
                raise ParamError(
                    "bad_words",
                    f"each bad word must have 1 to {MAX_STOP_CHARS} characters, not all blank; got {word!r}",
                )
        if self.max_new_tokens is not None and self.min_tokens > self.max_new_tokens:
            raise ParamError(
                "min_tokens",
                f"min_tokens ({self.min_tokens}) must be at most max_new_tokens ({self.max_new_tokens})",
            )
        if len(self.logit_bias) > MAX_LOGIT_BIAS:
            raise ParamError(
                "logit_bias", f"logit_bias takes at most {MAX_LOGIT_BIAS} tokens, got {len(self.logit_bias)}"
            )
        for token, bias in self.logit_bias:
            if isinstance(token, bool) or not isinstance(token, int) or token < 0:
                raise ParamError(
                    "logit_bias", f"logit_bias keys must be token ids (integers >= 0), got {token!r}"
                )
            try:
                LOGIT_BIAS_RANGE.check(f'logit_bias["{token}"]', bias)
            except ParamError as exc:
                raise ParamError("logit_bias", exc.message) from None

    @property
    def penalizes_counts(self) -> bool:
        """Whether presence_penalty or frequency_penalty needs this row's generated-token counts."""
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0.0

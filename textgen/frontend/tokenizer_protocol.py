"""The tokenizer endpoints' bodies, in the shapes vLLM serves and lm-evaluation-harness's remote tokenizer
reads: POST /tokenize, POST /detokenize, GET /tokenizer_info."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = None
    prompt: str = Field(description="Text to tokenize, as ordinary text (special-token strings included).")
    add_special_tokens: bool = True

    def tokenize(self, tokenizer: Any, context_length: int) -> dict[str, Any]:
        tokens = tokenizer(self.prompt, add_special_tokens=self.add_special_tokens)["input_ids"]
        return {
            "count": len(tokens),
            "max_model_len": context_length,
            "tokens": list(tokens),
            "token_strs": None,
        }


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = None
    tokens: list[int]

    def detokenize(self, tokenizer: Any) -> dict[str, Any]:
        vocab = len(tokenizer)
        bad = next((t for t in self.tokens if not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"tokens holds token id {bad}, outside this model's vocabulary [0, {vocab})")
        return {"prompt": tokenizer.decode(self.tokens)}


def tokenizer_info(tokenizer: Any, context_length: int) -> dict[str, Any]:
    """What a client needs to tokenize and template exactly as the server does."""
    return {
        "tokenizer_class": type(tokenizer).__name__,
        "eos_token": tokenizer.eos_token,
        "bos_token": tokenizer.bos_token,
        "pad_token": tokenizer.pad_token,
        "unk_token": tokenizer.unk_token,
        "chat_template": getattr(tokenizer, "chat_template", None),
        "model_max_length": context_length,
        "vocab_size": len(tokenizer),
    }

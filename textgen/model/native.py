"""textgen's own forward pass for decoding steps of the two model families it serves by default.

A decoding step reads every weight once and does little else, so on a CPU the Python around the products is
a large share of it: Hugging Face's GPT-2 forward wraps each layer in module calls, keyword plumbing, mask
building and output objects that a step in textgen's batch never uses (its attention masks come from the
segmented cache). Measured on the AMX Xeon, random GPT-2 124M in bfloat16, one row greedy: a bare loop like
the one below (the same products, attention and layer norms, over plain buffers) took 12.9 ms a step against
15.9 through Hugging Face's forward; in textgen's batch, with its cache's bookkeeping, 14.1 against 15.0 (int8:
8.5 against 9.6; 32 rows: 32.1 against 34.3). So GPT-2 (the default) and Llama (SmolLM2, the offline default)
decode through this module; every other model, and every prompt's first pass, goes through Hugging Face's.

The pass takes the same packed batch as Hugging Face's does in textgen (textgen/engine/batch.py): tokens
[T] with their positions, and a segmented cache whose `update(keys, values, layer)` stores each part's new
keys and values and whose `parts(layer)` gives what each part attends over (textgen/model/attention.py).
It calls the model's own submodules (textgen's packed or int8 products, fused activations), so it computes
what Hugging Face's forward computes, in the same order; tests/test_native.py checks the logits against it.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch

from textgen.model.attention import segmented_attention


class GPT2Decoding:
    """GPT-2: learned positions, pre-norm blocks, one product for queries, keys and values."""

    def __init__(self, model: Any) -> None:
        body = model.transformer
        self.embeddings, self.positions = body.wte, body.wpe
        self.blocks, self.final_norm, self.head = list(body.h), body.ln_f, model.lm_head
        self.heads = model.config.num_attention_heads
        self.width = model.config.hidden_size

    def __call__(
        self, ids: torch.Tensor, positions: torch.Tensor, cache: Any, keep: torch.Tensor | None
    ) -> torch.Tensor:
        """Logits [kept tokens, V] of tokens `ids` [T] at `positions` [T]; `keep`: the tokens whose logits are
        wanted (None: all)."""
        hidden = self.embeddings(ids) + self.positions(positions)  # [T, width]
        tokens = hidden.shape[0]
        for index, block in enumerate(self.blocks):
            attention = block.attn
            qkv = attention.c_attn(block.ln_1(hidden)).view(tokens, 3, self.heads, -1).permute(1, 2, 0, 3)
            query, key, value = qkv.unsqueeze(1).unbind(0)  # each [1, heads, T, head_dim]
            cache.update(key, value, index)
            out = segmented_attention(query, cache, index, attention.scaling)  # [1, T, heads, head_dim]
            hidden = hidden + attention.c_proj(out.reshape(tokens, self.width))
            hidden = hidden + block.mlp(block.ln_2(hidden))
        return self.head(self.final_norm(hidden if keep is None else hidden[keep]))


class LlamaDecoding:
    """Llama and kin (SmolLM2): rotary positions, RMS norms, grouped-query attention, gated MLP."""

    def __init__(self, model: Any) -> None:
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        body = model.model
        self.rotate = apply_rotary_pos_emb
        self.embeddings, self.rotary = body.embed_tokens, body.rotary_emb
        self.blocks, self.final_norm, self.head = list(body.layers), body.norm, model.lm_head

    def __call__(
        self, ids: torch.Tensor, positions: torch.Tensor, cache: Any, keep: torch.Tensor | None
    ) -> torch.Tensor:
        """Logits [kept tokens, V] of tokens `ids` [T] at `positions` [T]; `keep`: the tokens whose logits are
        wanted (None: all)."""
        hidden = self.embeddings(ids)  # [T, width]
        tokens = hidden.shape[0]
        cos, sin = self.rotary(hidden[None], positions[None])
        for index, block in enumerate(self.blocks):
            attention = block.self_attn
            normed = block.input_layernorm(hidden)
            shape = (1, tokens, -1, attention.head_dim)
            query = attention.q_proj(normed).view(shape).transpose(1, 2)
            key = attention.k_proj(normed).view(shape).transpose(1, 2)
            value = attention.v_proj(normed).view(shape).transpose(1, 2)
            query, key = self.rotate(query, key, cos, sin)
            cache.update(key, value, index)
            out = segmented_attention(query, cache, index, attention.scaling)
            hidden = hidden + attention.o_proj(out.reshape(tokens, -1))
            hidden = hidden + block.mlp(block.post_attention_layernorm(hidden))
        return self.head(self.final_norm(hidden if keep is None else hidden[keep]))


_DECODINGS: weakref.WeakKeyDictionary[Any, GPT2Decoding | LlamaDecoding | None] = weakref.WeakKeyDictionary()


def native_decoding(model: Any) -> GPT2Decoding | LlamaDecoding | None:
    """textgen's forward pass for `model`'s decoding steps, or None where Hugging Face's must serve: other
    architectures, and GPT-2 or Llama configurations this pass does not reproduce. Made once per model."""
    if model not in _DECODINGS:
        _DECODINGS[model] = _native_decoding(model)
    return _DECODINGS[model]


def _native_decoding(model: Any) -> GPT2Decoding | LlamaDecoding | None:
    config = model.config
    kind = type(model).__name__
    if kind == "GPT2LMHeadModel" and not (
        config.reorder_and_upcast_attn or getattr(config, "add_cross_attention", False)
    ):
        return GPT2Decoding(model)
    if kind == "LlamaForCausalLM" and not getattr(config, "pretraining_tp", 1) > 1:
        return LlamaDecoding(model)
    return None

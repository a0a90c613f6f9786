"""textgen's own forward pass for decoding steps of the two model families it serves by default.

A decoding step reads every weight once and does little else, so on a CPU the Python around the products is
a large share of it: Hugging Face's GPT-2 forward wraps each layer in module calls, keyword plumbing, mask
building and output objects that a step in textgen's batch never uses (its attention masks come from the
segmented cache). Measured on the AMX Xeon, random GPT-2 124M in bfloat16, one row greedy: a bare loop like
the one below (the same products, attention and layer norms, over plain buffers) took 12.9 ms a step against
15.9 through Hugging Face's forward; in textgen's batch, with its cache's bookkeeping, 14.1 against 15.0 (int8:
8.5 against 9.6; 32 rows: 32.1 against 34.3). So GPT-2 (the default) and Llama (SmolLM2, the offline default)
decode through this module, and prefill prompts of one length (textgen/engine/batch.py); every other model,
and prompts of several lengths prefilled together, go through Hugging Face's.

The pass takes the same packed batch as Hugging Face's does in textgen (textgen/engine/batch.py): tokens
[T] with their positions, and a segmented cache whose `update(keys, values, layer)` stores each part's new
keys and values and whose `parts(layer)` gives what each part attends over (textgen/model/attention.py).
It calls the model's own submodules (textgen's packed or int8 products, fused activations), so it computes
what Hugging Face's forward computes, in the same order; tests/test_native.py checks the logits against it.
A lone row (one stream: its prompt, then each step) also has a form over plain tensors (`lone_row`),
compiled ahead of time as a whole (textgen/model/compiled.py); tests/test_compiled.py checks it against the
pass above.
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from textgen.model.attention import cache_dtype, compiled_attention_wins, sdpa_wins, segmented_attention
from textgen.model.compiled import AheadOfTime, Buffers, LoneRow, LoneRowPasses, compile_in_background
from textgen.model.compiled_attention import RowsAttention, summed_attention
from textgen.model.cpu import CpuInfo, this_cpu
from textgen.model.formats import BFLOAT16_LAYERS, packs_float32


class NativeDecoding:
    """A family's pass: the batch's (`__call__`) and a lone row's (`lone_row`), around the family's
    `embed` and `_blocks`; its compiled programs (textgen/model/compiled.py) are made by `_programs`."""

    layers: list[tuple[Any, ...]]
    final_norm: Callable[[torch.Tensor], torch.Tensor]
    head: Callable[[torch.Tensor], torch.Tensor]

    def _programs(self, heads: int, kv_heads: int, head_dim: int, model: Any, body: torch.nn.Module) -> None:
        """The lone row's compiled pass and the batch's compiled attention (compiled later, if ever); `body`:
        the model's module holding the tensors of the lone row's pass."""
        whole = weakref.ref(model)  # not the model itself: _DECODINGS is keyed by it, weakly
        self.lone = LoneRowPasses(
            self.embed,
            self.lone_row,
            self.head,
            (kv_heads, head_dim),
            len(self.layers),
            body,
            lambda: _traced_pass(whole),
            cache_dtype(model),
            model.config.to_dict(),
        )
        self.attention = RowsAttention(heads, kv_heads, head_dim)

    def __call__(
        self, ids: torch.Tensor, positions: torch.Tensor, cache: Any, keep: torch.Tensor | None
    ) -> torch.Tensor:
        """Logits [kept tokens, V] of tokens `ids` [T] at `positions` [T]; `keep`: the tokens whose logits are
        wanted (None: all)."""
        logits = self.lone.run(ids, positions, cache, keep)
        if logits is not None:
            return logits
        hidden = self._blocks(self.embed(ids, positions), positions, _segmented(cache, self.attention))
        return self.head(self.final_norm(hidden if keep is None else hidden[keep]))

    def lone_row(self, hidden: torch.Tensor, positions: torch.Tensor, buffers: Buffers) -> torch.Tensor:
        """A lone row's pass after its embedding, tensors only (compiled: textgen/model/compiled.py): the
        final hidden states [T, width] of the T tokens embedded as `hidden` [T, width] at `positions` [T]
        (one token of a step, or a whole prompt), whose keys and values go into each layer's `buffers`
        (keys, values [1, kv_heads, C, head_dim]) at columns `positions`, each attending over the columns up
        to its own."""
        return self.final_norm(self._blocks(hidden, positions, _lone_row(buffers, positions)))

    def embed(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The input hidden states [T, width] of tokens `ids` [T] at `positions` [T]."""
        raise NotImplementedError

    def _blocks(self, hidden: torch.Tensor, positions: torch.Tensor, attend: Attend) -> torch.Tensor:
        """The blocks over hidden states [T, width] at `positions`, attention by `attend`."""
        raise NotImplementedError


class GPT2Decoding(NativeDecoding):
    """GPT-2: learned positions, pre-norm blocks, one product for queries, keys and values."""

    def __init__(self, model: Any) -> None:
        body = model.transformer
        self.embeddings, self.positions = body.wte.forward, body.wpe.forward
        self.final_norm, self.head = body.ln_f.forward, model.lm_head.forward
        self.heads = model.config.num_attention_heads
        self.width = model.config.hidden_size
        # Each block's calls, bound once (see _bound): the MLP as GPT2MLP computes it, its dropout left out
        # (the model serves in eval mode, where dropout returns its input).
        self.layers = [
            (*_bound(block.ln_1, block.attn.c_attn, block.attn.c_proj), block.attn.scaling)
            + _bound(block.ln_2, block.mlp.c_fc, block.mlp.act, block.mlp.c_proj)
            for block in body.h
        ]
        self._programs(self.heads, self.heads, self.width // self.heads, model, body)

    def embed(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The input hidden states [T, width] of tokens `ids` [T] at `positions` [T]."""
        return self.embeddings(ids) + self.positions(positions)

    def _blocks(self, hidden: torch.Tensor, positions: torch.Tensor, attend: Attend) -> torch.Tensor:
        """The blocks over hidden states [T, width], attention by `attend` (the positions entered with the
        embeddings)."""
        tokens = hidden.shape[0]
        for index, (ln_1, qkv, project, scaling, ln_2, up, act, down) in enumerate(self.layers):
            qkv_heads = qkv(ln_1(hidden)).view(tokens, 3, self.heads, -1).permute(1, 2, 0, 3)
            query, key, value = qkv_heads.unsqueeze(1).unbind(0)  # each [1, heads, T, head_dim]
            hidden = hidden + project(attend(index, query, key, value, scaling))
            hidden = hidden + down(act(up(ln_2(hidden))))
        return hidden


class LlamaDecoding(NativeDecoding):
    """Llama and kin (SmolLM2): rotary positions, RMS norms, grouped-query attention, gated MLP."""

    def __init__(self, model: Any) -> None:
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        body = model.model
        self.rotate = apply_rotary_pos_emb
        self.embeddings, self.rotary = body.embed_tokens.forward, body.rotary_emb.forward
        self.final_norm, self.head = body.norm.forward, model.lm_head.forward
        # Each block's calls, bound once (see _bound); the MLP as LlamaMLP computes it.
        self.layers = [
            _bound(
                block.input_layernorm,
                block.self_attn.q_proj,
                block.self_attn.k_proj,
                block.self_attn.v_proj,
                block.self_attn.o_proj,
                block.post_attention_layernorm,
                block.mlp.gate_proj,
                block.mlp.up_proj,
                block.mlp.act_fn,
                block.mlp.down_proj,
            )
            + (block.self_attn.head_dim, block.self_attn.scaling)
            for block in body.layers
        ]
        config = model.config
        heads = config.num_attention_heads
        head_dim = body.layers[0].self_attn.head_dim
        self._programs(heads, config.num_key_value_heads or heads, head_dim, model, body)

    def embed(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The input hidden states [T, width] of tokens `ids` [T] (positions enter as rotations, later)."""
        return self.embeddings(ids)

    def _blocks(self, hidden: torch.Tensor, positions: torch.Tensor, attend: Attend) -> torch.Tensor:
        """The blocks over hidden states [T, width] at `positions`, attention by `attend`."""
        tokens = hidden.shape[0]
        cos, sin = self.rotary(hidden[None], positions[None])
        for index, layer in enumerate(self.layers):
            norm, q_proj, k_proj, v_proj, o_proj, post_norm, gate, up, act, down, head_dim, scaling = layer
            normed = norm(hidden)
            shape = (1, tokens, -1, head_dim)
            query = q_proj(normed).view(shape).transpose(1, 2)
            key = k_proj(normed).view(shape).transpose(1, 2)
            value = v_proj(normed).view(shape).transpose(1, 2)
            query, key = self.rotate(query, key, cos, sin)
            hidden = hidden + o_proj(attend(index, query, key, value, scaling))
            normed = post_norm(hidden)
            hidden = hidden + down(act(gate(normed)) * up(normed))
        return hidden


# A block's attention: (layer, query [1, heads, T, head_dim], key and value [1, kv_heads, T, head_dim],
# scaling) -> its output [T, heads * head_dim]. The batch's pass and a lone row's step differ only there.
Attend = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]


def _segmented(cache: Any, rows_kernel: RowsAttention) -> Attend:
    """Attention in textgen's batch: the new keys and values stored by the segmented cache, each part
    attending over its own buffers (textgen/model/attention.py), decoding rows with `rows_kernel` once
    compiled, where it wins."""

    def attend(
        index: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float
    ) -> torch.Tensor:
        cache.update(key, value, index)
        out = segmented_attention(query, cache, index, scaling, rows_kernel)  # [1, T, heads, head_dim]
        return out.reshape(query.shape[2], -1)

    return attend


def _lone_row(buffers: Buffers, positions: torch.Tensor) -> Attend:
    """Attention of a lone row's tokens at `positions` [T] over its layers' `buffers` (_attend_lone)."""

    def attend(
        index: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float
    ) -> torch.Tensor:
        keys, values = buffers[index]
        return _attend_lone(query, key, value, keys, values, positions, scaling)

    return attend


def _attend_lone(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    positions: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """A lone row's attention [T, heads * head_dim] for its T tokens: their keys and values [1, kv_heads, T,
    head_dim] written at columns `positions` [T] of the layer's buffers, their queries [1, heads, T, head_dim]
    each over the columns up to its own (what textgen/model/attention.py computes for a lone row, with the
    mask made here)."""
    keys.index_copy_(2, positions, key.to(keys.dtype))  # the cache's dtype (attention.py `cache_dtype`)
    values.index_copy_(2, positions, value.to(values.dtype))
    tokens = positions.shape[0]
    # Each token's positions, not the later tokens' nor spare room: [1, 1, T, C].
    visible = (torch.arange(keys.shape[2]).view(1, -1) <= positions.view(-1, 1)).view(1, 1, tokens, -1)
    heads, kv_heads = query.shape[1], keys.shape[1]
    if not sdpa_wins(this_cpu(), 1, heads, kv_heads, keys.dtype, None):
        # As elementwise products and sums, which inductor fuses into loops over the buffers: compiled
        # steps in one process, alternating blocks, on the Zen 4 EPYC: random GPT-2 4.83-5.21 ms a step
        # against SDPA's 5.54-6.42; SmolLM2 7.61-8.35 against 8.39-9.93. Two matmuls did not compile for
        # SmolLM2: inductor's C++ GEMM template, the products' kernel there (compiled.py), has no choice
        # for its grouped ones.
        out = summed_attention(query, keys, values, visible, scaling)
    else:
        out = F.scaled_dot_product_attention(
            query.to(keys.dtype), keys, values, attn_mask=visible, scale=scaling, enable_gqa=kv_heads != heads
        ).to(query.dtype)
    return out.transpose(1, 2).reshape(tokens, -1)  # [1, heads, T, head_dim] to tokens-major


def _bound(*modules: torch.nn.Module) -> tuple[Any, ...]:
    """The modules' `forward` methods, bound once: calling a module goes through nn.Module.__call__ (hooks,
    tracing checks) and each `block.attn.c_attn` is three attribute lookups through nn.Module.__getattr__.
    Measured in the batch's step (GPT-2 bfloat16, AMX Xeon, interleaved A/B, three runs each): one row
    12.4-13.4 ms through the modules' calls, 11.8-12.0 with these; 8 rows 17.0-17.7 against 16.2-16.5.
    textgen registers no hooks on the model."""
    return tuple(module.forward for module in modules)


def _traced_pass(model: weakref.ref[Any]) -> tuple[LoneRow, torch.nn.Module]:
    """The lone row's pass of `model` and its body, for torch.export to trace, over a shadow of the model's
    modules (`shadow_modules`): what export swaps in them stays out of the modules the engine runs."""
    whole = model()
    if whole is None:
        raise RuntimeError("the model was released before its pass was traced")
    decoding = _native_decoding(shadow_modules(whole))
    assert decoding is not None  # the same kind of model as the one being served
    return decoding.lone_row, decoding.lone.body


def shadow_modules(
    module: torch.nn.Module, memo: dict[int, torch.nn.Module] | None = None
) -> torch.nn.Module:
    """A copy of `module` and its submodules that shares their tensors: each module a new object with its
    own tables of parameters, buffers and submodules (a module reached twice copied once), so setting one of
    the copy's tensors leaves the original's in place. It costs the modules' objects, not their weights."""
    memo = {} if memo is None else memo
    if id(module) in memo:
        return memo[id(module)]
    clone = memo[id(module)] = copy.copy(module)
    clone._parameters = dict(module._parameters)
    clone._buffers = dict(module._buffers)
    clone._modules = {
        name: None if child is None else shadow_modules(child, memo)
        for name, child in module._modules.items()
    }
    return clone


_DECODINGS: weakref.WeakKeyDictionary[Any, NativeDecoding | None] = weakref.WeakKeyDictionary()


def native_decoding(model: Any) -> NativeDecoding | None:
    """textgen's forward pass for `model`'s decoding steps, or None where Hugging Face's must serve: other
    architectures, and GPT-2 or Llama configurations this pass does not reproduce. Made once per model."""
    if model not in _DECODINGS:
        _DECODINGS[model] = _native_decoding(model)
    return _DECODINGS[model]


def _native_decoding(model: Any) -> NativeDecoding | None:
    config = model.config
    kind = type(model).__name__
    if kind == "GPT2LMHeadModel" and not (
        config.reorder_and_upcast_attn or getattr(config, "add_cross_attention", False)
    ):
        return GPT2Decoding(model)
    if kind == "LlamaForCausalLM" and not getattr(config, "pretraining_tp", 1) > 1:
        return LlamaDecoding(model)
    return None


def start_compiling(
    model: Any, dtype: str, cache_dir: Path | None = None, apart: Mapping[str, str] | None = None
) -> str:
    """Compile `model`'s decoding programs in the background (textgen/model/compiled.py) where its pass is
    textgen's and its format (`dtype`, TEXTGEN_DTYPE resolved) compiles (`compiled_dtype`), cached in
    `cache_dir` and, with `apart`, compiled in a process of its own: the batch's attention of decoding rows
    where it wins on this CPU (textgen/model/compiled_attention.py; the first, seconds), then a lone
    stream's passes (its prompt and its steps). Returns the latter's state for the log."""
    decoding = native_decoding(model)
    if decoding is None:
        return "off: Hugging Face's forward pass decodes this model"
    tensors, rows = compiled_dtype(dtype), attention_dtype(model, dtype)
    programs: list[tuple[AheadOfTime, torch.dtype]] = []
    attention = decoding.attention
    if rows is None:
        attention.state = f"off: {dtype} decodes eagerly"
    elif compiled_attention_wins(this_cpu(), 1, attention.heads, attention.kv_heads, rows, 1):
        programs.append((attention, rows))
    else:
        attention.state = "off: the matmuls or SDPA are the faster kernels on this CPU"
    if tensors is None:
        # float32-int8head compiles but where its layers are packed (`compiled_dtype`): say so
        packed = dtype == "float32-int8head"
        why = " (its float32 products are oneDNN's packed ones here)" if packed else ""
        decoding.lone.state = f"off: {dtype} decodes eagerly{why}"
    else:
        programs.append((decoding.lone, tensors))
    if programs:
        compile_in_background(programs, cache_dir, apart)
    return decoding.lone.state


def attention_dtype(model: Any, dtype: str) -> torch.dtype | None:
    """The keys and values the batch's compiled attention of decoding rows would take for `model` served in
    `dtype` (TEXTGEN_DTYPE resolved), or None: that format decodes eagerly. The cache's own dtype where it
    has one (float32-int8head's float16, whose layers compile or not), else the lone pass's."""
    cached = cache_dtype(model)
    return cached if cached is not None else compiled_dtype(dtype)


def compiled_dtype(dtype: str, cpu: CpuInfo | None = None) -> torch.dtype | None:
    """The tensors a format's lone-stream pass compiles for (`dtype`, TEXTGEN_DTYPE resolved) on `cpu` (this
    one by default), or None: it decodes eagerly. bfloat16's layers (bfloat16-int8head's too: its output
    layer is outside the pass), and float32-int8head's float32 ones, which promise nothing bit for bit (the
    int8 output layer already rounds a row alone otherwise than in a batch), where their products are
    oneMKL's on the plain weights: where they are oneDNN's packed ones (`packs_float32`: AMD's CPUs) the
    program cannot take its weights, which are opaque. float16-int8head's float32 pass compiles everywhere:
    its products are FBGEMM's float16 ones, which the program calls by their weights' handles
    (textgen/model/compiled.py `float16_handles`). float32 and float32-packed keep the eager pass, whose
    rows compute the same alone and in a batch (fused layer norms round otherwise), and int8's products are
    FBGEMM's int8 ones, which inductor cannot take."""
    if dtype in BFLOAT16_LAYERS:
        return torch.bfloat16
    if dtype == "float16-int8head":
        return torch.float32
    if dtype == "float32-int8head" and not packs_float32(dtype, cpu or this_cpu()):
        return torch.float32
    return None


def compile_state(model: Any, kind: str = "step") -> str:
    """What became of compiling a lone stream's passes (`kind` "step") or the batch's attention ("attention"):
    "off: why", "compiling", "compiled in N s" ("off" for anything but a loaded model)."""
    decoding = native_decoding(model) if hasattr(model, "config") else None
    if decoding is None:
        return "off"
    return (decoding.lone if kind == "step" else decoding.attention).state

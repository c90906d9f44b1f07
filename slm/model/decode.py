"""A decoder for generation speed: pretransposed weights, a static KV cache, an optionally compiled step.

Generating one token multiplies a single row by every weight matrix. On CPUs with MKL, `x @ W.T` (nn.Linear, W
stored [out, in]) goes through a matrix-vector path that reads memory at a fraction of the streaming speed; the same
product with W stored transposed ([in, out]) reaches it much more closely (benchmarks/decode.py measures the gain).
`transpose_linears` swaps every nn.Linear of a model for such a layer, in place (the model is then for inference
only: its state_dict names change).

`StaticDecoder` keeps one preallocated cache per layer and runs each new token over the whole cache with a key mask,
so every step has the same shapes: torch.compile then makes one graph of the step (no recompilation as the cache
fills) and fuses its small element-wise operations, which otherwise cost as much as the matrix products on a small
model. The prompt goes through the model's own forward (one batched pass); the logits equal the model's forward
(a test holds them to it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from slm.model.transformer import KVCache, Transformer, apply_rotary, attend


class TransposedLinear(nn.Module):
    """y = x @ W_t (+ b), with W_t = W.T stored contiguous: the faster layout for one-row products on CPUs."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.weight_t = nn.Parameter(linear.weight.detach().t().contiguous(), requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x @ self.weight_t
        return y if self.bias is None else y + self.bias


def transpose_linears(model: nn.Module) -> nn.Module:
    """Replace every nn.Linear of MODEL by a TransposedLinear (in place; a tied output matrix gets its own copy)."""
    for name, child in model.named_children():
        if isinstance(child, nn.Linear):
            setattr(model, name, TransposedLinear(child))
        else:
            transpose_linears(child)
    return model


class StaticDecoder:
    """Greedy or sampled generation with a cache of fixed size MAX_LEN for BATCH rows (all rows the same length).

        dec = StaticDecoder(model, batch=1, max_len=len(prompt) + new, compile=True)
        logits = dec.prefill(prompt_ids)          # [B, V], the last prompt position
        logits = dec.step(next_ids)               # [B, V], one new token per row
    """

    def __init__(self, model: Transformer, batch: int, max_len: int, compile: bool = False):
        if max_len > model.cfg.max_seq_len:
            raise ValueError(f"{max_len} positions, more than the model's max_seq_len {model.cfg.max_seq_len}")
        self.model = model
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.cache = KVCache(model.cfg, batch, max_len, self.device, self.dtype)
        self.batch, self.max_len = batch, max_len
        self.valid = torch.zeros((1, 1, 1, max_len), dtype=torch.bool, device=self.device)
        self.length = 0
        # dynamic=False: every step has the same shapes, so one graph serves them all
        self._step = torch.compile(_step, dynamic=False, fullgraph=True) if compile else _step

    def reset(self) -> None:
        self.valid.zero_()
        self.length = 0
        self.cache.length = 0

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        """Run the prompt ids [B, T] (from an empty cache): the logits of its last position [B, V]."""
        self.reset()
        T = ids.shape[1]
        if T >= self.max_len:
            raise ValueError(f"the prompt has {T} tokens; the cache holds {self.max_len}")
        logits = self.model(ids.to(self.device), cache=self.cache)[:, -1]
        self.valid[..., :T] = True
        self.length = T
        return logits

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """One new token per row (ids [B] or [B, 1]): the logits that follow it [B, V]."""
        if self.length >= self.max_len:
            raise ValueError(f"the cache holds {self.max_len} positions and is full")
        pos = self.length
        self.valid[..., pos] = True
        tokens = tokens.reshape(self.batch, 1).to(self.device)
        position = torch.full((self.batch, 1), pos, dtype=torch.long, device=self.device)
        slot = torch.tensor([pos], dtype=torch.long, device=self.device)
        logits = self._step(self.model, tokens, position, slot, self.valid, self.cache.k, self.cache.v)
        self.length = pos + 1
        self.cache.length = pos + 1
        return logits


def _step(model: Transformer, tokens, position, slot, valid, keys: list, values: list) -> torch.Tensor:
    """The model's forward for one token per row against the whole static cache (positions not yet written are
    masked by VALID [1, 1, 1, max_len]); writes this token's keys and values at SLOT."""
    B = tokens.shape[0]
    x = model.embed_tokens(tokens)
    cos, sin = model.rotary(position, x.dtype)
    for i, layer in enumerate(model.layers):
        attn = layer.self_attn
        h, kv = attn.n_heads, attn.n_kv
        q, k, v = attn.qkv_proj(layer.input_layernorm(x)).view(B, 1, h + 2 * kv, attn.head_dim).split([h, kv, kv], 2)
        q, k = apply_rotary(q, cos, sin).transpose(1, 2), apply_rotary(k, cos, sin).transpose(1, 2)
        keys[i].index_copy_(2, slot, k)
        values[i].index_copy_(2, slot, v.transpose(1, 2))
        y = attend(q, keys[i], values[i], valid)
        x = x + attn.o_proj(y.transpose(1, 2).reshape(B, 1, h * attn.head_dim))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return model.lm_head(model.norm(x))[:, -1]


class PastAsInputs(nn.Module):
    """(input_ids [B, T], past_keys, past_values) -> (logits [B, T, V], keys, values), keys and values [layers,
    B, kv heads, tokens, head dim] (past may hold 0); new tokens take positions past.. and attend causally."""

    def __init__(self, model: Transformer):
        super().__init__()
        self.m = model

    def forward(self, input_ids, past_keys, past_values):
        m, cfg = self.m, self.m.cfg
        B, T = input_ids.shape
        P = past_keys.shape[3]
        positions = torch.arange(T, device=input_ids.device) + P
        x = m.embed_tokens(input_ids)
        cos, sin = m.rotary(positions[None].expand(B, T), x.dtype)
        mask = torch.arange(P + T, device=input_ids.device)[None, :] <= positions[:, None]  # [T, P+T]
        new_k, new_v = [], []
        h, kv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        for i, layer in enumerate(m.layers):
            a = layer.self_attn
            q, k, v = a.qkv_proj(layer.input_layernorm(x)).view(B, T, h + 2 * kv, hd).split([h, kv, kv], dim=2)
            q = apply_rotary(q, cos, sin).transpose(1, 2)
            k = torch.cat([past_keys[i], apply_rotary(k, cos, sin).transpose(1, 2)], dim=2)
            v = torch.cat([past_values[i], v.transpose(1, 2)], dim=2)
            new_k.append(k)
            new_v.append(v)
            if kv != h:
                k, v = k.repeat_interleave(h // kv, dim=1), v.repeat_interleave(h // kv, dim=1)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            x = x + a.o_proj(y.transpose(1, 2).reshape(B, T, h * hd))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return m.lm_head(m.norm(x)), torch.stack(new_k), torch.stack(new_v)

"""A decoder for generation speed: weights laid out for one-row products, a static KV cache, a compiled step.

Generating one token multiplies a single row by every weight matrix, and on a CPU that is bound by how fast the
weights are read. Two things decide it with MKL (measured at SmolLM2-135M's shapes on 2 cores):
- the layout: `x @ W.T` (nn.Linear, W stored [out, in]) reads a wide matrix at a fraction of the streaming speed;
  stored transposed ([in, out]) it comes much closer; a tall one (in > out, the MLP's down projection) is read
  faster in nn.Linear's own layout;
- the threads: MKL runs a one-row product on one core, which cannot draw the machine's bandwidth. The product is
  split into one block of the stored matrix's rows per thread (torch.bmm spreads the blocks over its threads; the
  blocks are views, nothing is copied): of [in, out], the partial products are summed; of [out, in], each block
  gives its share of the outputs. 1.3-1.7x faster than one MKL call per matrix.
`decode_linears` swaps every nn.Linear of a model for such a layer, in place (the model is then for inference only:
its state_dict names change).

`StaticDecoder` keeps one preallocated cache per layer. Compiled, each new token runs over the whole cache with a key
mask, so every step has the same shapes: torch.compile makes one graph of the step (no recompilation as the cache
fills) and fuses its small element-wise operations, which otherwise cost several microseconds each on a small model
(its products are single calls: see DecodeLinear.forward). Eager, each token attends to the written part of the
cache only, and the queries and keys are rotated by one small product. The prompt goes through the model's own
forward (one batched pass); the logits equal the model's forward (a test holds them to it, on 1, 2 and 3 threads).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from slm.model.transformer import KVCache, Transformer, apply_rotary, attend


class DecodeLinear(nn.Module):
    """An nn.Linear for generation on CPUs (the module docstring says why). by_output False: weight is W.T stored
    [in, out] (y = x @ weight); True (in > out): weight is W, [out, in] (y = x @ weight.T). One row on several
    threads, eager: the product split by blocks of weight's rows, in parallel. Several rows (a prompt), or
    compiled: one product."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach()
        self.by_output = w.shape[1] > w.shape[0]
        self.weight = nn.Parameter(w.clone() if self.by_output else w.t().contiguous(), requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if x.numel() != x.shape[-1] or w.device.type != "cpu" or torch.compiler.is_compiling():
            # compiled: one product (inductor rewrites the batched one-row products as slower loops, and the same
            # products as an opaque custom op ran slower than this when the step is called from a function)
            y = F.linear(x, w) if self.by_output else x @ w
        else:
            y = _one_row(x.reshape(-1), w, row_blocks(w.shape[0]), self.by_output).view(*x.shape[:-1], -1)
        return y if self.bias is None else y + self.bias


def _one_row(x: torch.Tensor, w: torch.Tensor, n: int, by_output: bool) -> torch.Tensor:
    """x [in] times the stored W (DecodeLinear's layouts) in N blocks of W's rows, the blocks in parallel: [out]."""
    if n == 1:
        return F.linear(x, w) if by_output else x @ w
    if by_output:  # block b holds outputs b*out/n..: each block's product is its share of y
        return torch.bmm(x.view(1, 1, -1).expand(n, 1, -1), w.view(n, -1, w.shape[1]).transpose(1, 2)).view(-1)
    return torch.bmm(x.view(n, 1, -1), w.view(n, -1, w.shape[1])).sum(0).view(-1)  # blocks of inputs: summed


def row_blocks(rows: int) -> int:
    """How many blocks of rows a one-row product is split into: torch's thread count, or the largest divisor of
    ROWS below it (1: not split)."""
    threads = torch.get_num_threads()
    return next(b for b in range(min(threads, rows), 0, -1) if rows % b == 0)


def decode_linears(model: nn.Module) -> nn.Module:
    """Replace every nn.Linear of MODEL by a DecodeLinear (in place; a tied output matrix gets its own copy)."""
    for name, child in model.named_children():
        if isinstance(child, nn.Linear):
            setattr(model, name, DecodeLinear(child))
        else:
            decode_linears(child)
    return model


class StaticDecoder:
    """Greedy or sampled generation with a cache of fixed size MAX_LEN for BATCH rows (all rows the same length).

        dec = StaticDecoder(model, batch=1, max_len=len(prompt) + new, compile=True)
        logits = dec.prefill(prompt_ids)          # [B, V], the last prompt position
        logits = dec.step(next_ids)               # [B, V], one new token per row
    """

    def __init__(self, model: Transformer, batch: int, max_len: int, compile: bool | str = False):
        """COMPILE: True compiles the step (torch.compile's default mode); "reduce-overhead" also replays it as a CUDA
        graph on a GPU, where a step of a small model is a few hundred short kernels whose launches would bound it
        (the cache and the mask keep their addresses, marked static; each step's logits are copied out of the
        graph's memory, which the next replay overwrites). On a CPU "reduce-overhead" is the default mode."""
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
        if compile not in (False, True, "reduce-overhead"):
            raise ValueError(f"compile: expected True, False or 'reduce-overhead', got {compile!r}")
        self._graphs = compile == "reduce-overhead"
        if self._graphs:
            from torch._dynamo import mark_static_address

            for t in (*self.cache.k, *self.cache.v, self.valid):
                mark_static_address(t)
        self._step = torch.compile(_step, dynamic=False, fullgraph=True,
                                   mode="reduce-overhead" if self._graphs else None) if compile else _step

    def _rotation(self, pos: int) -> torch.Tensor:
        """The rotary embedding at position POS as a [head_dim, head_dim] matrix (x @ R = apply_rotary(x)): one
        small product per layer in the eager step instead of ten element-wise operations, each of which costs
        several microseconds after a matrix product has swept the caches."""
        cfg = self.model.cfg
        cos, sin = self.model.rotary(torch.tensor([[pos]], device=self.device), self.dtype)
        half = cos.shape[-1] // 2
        c, s = cos.reshape(-1)[:half], sin.reshape(-1)[:half]
        i = torch.arange(half, device=self.device)
        r = torch.eye(cfg.head_dim, dtype=self.dtype, device=self.device)
        r[i, i], r[i + half, i + half], r[i + half, i], r[i, i + half] = c, c, -s, s
        return r

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
        if self._step is _step:  # eager: attend to the written positions only (views), no mask to apply
            n = pos + 1
            logits = _step(self.model, tokens, position, slot, None, [k[:, :, :n] for k in self.cache.k],
                           [v[:, :, :n] for v in self.cache.v], rotation=self._rotation(pos))
        else:  # compiled: the same shapes at every step, the unwritten positions masked
            if self._graphs and hasattr(torch.compiler, "cudagraph_mark_step_begin"):
                torch.compiler.cudagraph_mark_step_begin()
            logits = self._step(self.model, tokens, position, slot, self.valid, self.cache.k, self.cache.v)
            if self._graphs:
                logits = logits.clone()
        self.length = pos + 1
        self.cache.length = pos + 1
        return logits


def _step(model: Transformer, tokens, position, slot, valid, keys: list, values: list,
          rotation: torch.Tensor | None = None) -> torch.Tensor:
    """The model's forward for one token per row against the cache (positions not yet written are masked by VALID
    [1, 1, 1, max_len]; VALID None: KEYS and VALUES are views of the written part and this step's slot); writes
    this token's keys and values at SLOT. The queries and keys are rotated together (they are adjacent heads of the
    fused projection), by ROTATION (StaticDecoder._rotation) when given."""
    B = tokens.shape[0]
    x = model.embed_tokens(tokens)
    cos, sin = model.rotary(position, x.dtype)
    for i, layer in enumerate(model.layers):
        attn = layer.self_attn
        h, kv = attn.n_heads, attn.n_kv
        qk, v = attn.qkv_proj(layer.input_layernorm(x)).view(B, 1, h + 2 * kv, attn.head_dim).split([h + kv, kv], 2)
        qk = apply_rotary(qk, cos, sin) if rotation is None else qk @ rotation
        q, k = qk.transpose(1, 2).split([h, kv], 1)
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

"""One decoder for both families slm trains, readable top to bottom.

StableLM 2 (arXiv 2402.17834; transformers' StableLmForCausalLM)
    pre-norm LayerNorm with bias (eps 1e-5), sequential residual, rotary embeddings on the first 25% of each head's
    dimensions (NeoX half-split layout, theta 10,000), biases only on the q, k, v projections, SwiGLU MLP,
    untied input and output embeddings.
SmolLM2 (arXiv 2502.02737; transformers' LlamaForCausalLM)
    RMSNorm (eps 1e-5), rotary on every dimension, grouped-query attention, SwiGLU, tied embeddings, no biases.

Packed sequences keep their documents apart: with `segment_ids` a token attends only to earlier tokens of its own
document, and `position_ids` restart at 0 at each document start (as StableLM 2 trained). On a GPU this uses
FlexAttention's block-sparse kernel, which never materialises a (T x T) mask; elsewhere a boolean mask goes to
scaled_dot_product_attention. Without document boundaries attention is plain causal SDPA (flash kernels on a GPU).

The q/k/v and gate/up projections are fused into one matrix each (one GEMM instead of three or two);
slm.model.hf maps the weights to and from transformers' names, and a test holds the logits equal.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from slm.errors import SlmError
from slm.model.loss import linear_cross_entropy, linear_token_logprobs

FAMILIES = ("stablelm", "llama")


@dataclass
class ModelConfig:
    family: str = "stablelm"
    """'stablelm' (StableLM 2: LayerNorm, partial rotary, qkv biases, untied) or 'llama' (SmolLM2: RMSNorm, GQA)."""
    vocab_size: int = 100_352
    """Rows of the embedding matrix: the tokenizer's ids padded to a multiple of 64."""
    hidden_size: int = 2048
    num_layers: int = 24
    num_heads: int = 32
    num_kv_heads: int = 32
    """Key/value heads; fewer than num_heads is grouped-query attention."""
    intermediate_size: int = 5632
    """SwiGLU hidden width."""
    max_seq_len: int = 4096
    """Longest sequence (context) the model is built for; sets max_position_embeddings."""
    rope_theta: float = 10_000.0
    partial_rotary_factor: float = 1.0
    """Fraction of each head's dimensions that rotary embeddings rotate (StableLM 2: 0.25)."""
    norm_eps: float = 1e-5
    qkv_bias: bool = False
    tie_embeddings: bool = False
    init_std: float = 0.02
    """Standard deviation of the normal initialisation of every weight matrix."""

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"model.family: expected one of {FAMILIES}, got {self.family!r}")
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size",
                     "max_seq_len"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"model.{name}: expected a positive integer, got {v!r}")
        for name, low, high in (("rope_theta", 0.0, math.inf), ("partial_rotary_factor", 0.0, 1.0),
                                ("norm_eps", 0.0, 1.0), ("init_std", 0.0, math.inf)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not low < v <= high:
                raise ValueError(f"model.{name}: expected a number in ({low:g}, {high:g}], got {v!r}")
        for name in ("qkv_bias", "tie_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"model.{name}: expected true or false, got {getattr(self, name)!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"model.hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"model.num_heads {self.num_heads} is not divisible by num_kv_heads {self.num_kv_heads}")
        if self.rotary_dim % 2:
            raise ValueError(f"model: rotary dimensions ({self.rotary_dim}) must be even")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"model: unknown field {sorted(unknown)[0]!r}")
        return cls(**d)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(F, "rms_norm") and x.dtype == torch.float32:  # one fused kernel (torch >= 2.4)
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.family == "stablelm":
        return nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)  # with bias, as transformers' StableLm
    return RMSNorm(cfg.hidden_size, cfg.norm_eps)


class Rotary(nn.Module):
    """cos/sin tables for positions 0..max_seq_len-1, gathered by position id (ids restart at document starts)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        dim = cfg.rotary_dim
        inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.max_seq_len = cfg.max_seq_len
        self._table: tuple[torch.Tensor, torch.Tensor] | None = None

    def table(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if self._table is None or self._table[0].device != device:
            pos = torch.arange(self.max_seq_len, device=device, dtype=torch.float)
            freqs = pos[:, None] * self.inv_freq.to(device)[None, :]
            emb = torch.cat((freqs, freqs), dim=-1)
            self._table = (emb.cos(), emb.sin())
        return self._table

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = self.table(position_ids.device)
        return cos[position_ids].to(dtype)[:, :, None], sin[position_ids].to(dtype)[:, :, None]  # [B, T, 1, rot]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """NeoX half-split rotation of the first cos.shape[-1] dims of every head of x; the rest pass through.

    x [B, T, heads, D]; cos, sin [B, T, 1, rot]. The two halves are rotated directly (x1 cos - x2 sin,
    x2 cos + x1 sin) rather than through a rotate-half copy; split (not slicing) keeps the backward to one cat."""
    rot = cos.shape[-1]
    half = rot // 2
    c, s = cos[..., :half], sin[..., :half]
    if rot < x.shape[-1]:
        x1, x2, rest = x.split([half, half, x.shape[-1] - rot], dim=-1)
        return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s, rest], dim=-1)
    x1, x2 = x.split([half, half], dim=-1)
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)


class KVCache:
    """Keys and values of every layer for generation: [B, kv_heads, max_len, head_dim] each, filled left to right."""

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, device, dtype):
        shape = (batch, cfg.num_kv_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_layers)]
        self.length = 0
        self.max_len = max_len


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.cfg, self.layer = cfg, layer
        self.n_heads, self.n_kv, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.qkv_proj = nn.Linear(cfg.hidden_size, (self.n_heads + 2 * self.n_kv) * self.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=False)

    def forward(self, x, cos, sin, mask, cache: KVCache | None):
        B, T, _ = x.shape
        h, kv = self.n_heads, self.n_kv
        q, k, v = self.qkv_proj(x).view(B, T, h + 2 * kv, self.head_dim).split([h, kv, kv], dim=2)
        q, k, v = apply_rotary(q, cos, sin).transpose(1, 2), apply_rotary(k, cos, sin).transpose(1, 2), v.transpose(1, 2)
        if cache is not None:
            start = cache.length
            cache.k[self.layer][:, :, start:start + T] = k
            cache.v[self.layer][:, :, start:start + T] = v
            k, v = cache.k[self.layer][:, :, :start + T], cache.v[self.layer][:, :, :start + T]
        y = attend(q, k, v, mask)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, h * self.head_dim))


def attend(q, k, v, mask) -> torch.Tensor:
    """mask: "causal", None (attend to everything: one new token against the cache), a boolean tensor
    broadcastable to [B, H, T, S] (True = attend), a FlexAttention BlockMask, or DocumentRuns (causal attention
    within each document of each row, one call per document)."""
    if isinstance(mask, DocumentRuns):
        rows = []
        for b, lengths in enumerate(mask.lengths):
            parts = zip(q[b:b + 1].split(lengths, 2), k[b:b + 1].split(lengths, 2), v[b:b + 1].split(lengths, 2))
            docs = [attend(qd, kd, vd, "causal") for qd, kd, vd in parts]
            rows.append(docs[0] if len(docs) == 1 else torch.cat(docs, dim=2))
        return rows[0] if len(rows) == 1 else torch.cat(rows, dim=0)
    gqa = q.shape[1] != k.shape[1]
    if mask is not None and not isinstance(mask, (str, torch.Tensor)):
        return _flex_attention()(q, k, v, block_mask=mask, enable_gqa=gqa)
    kwargs = {}
    if gqa:
        if _SDPA_GQA and not _expand_kv(q, k):
            kwargs["enable_gqa"] = True
        else:  # older torch, or a CPU backward that balances better over query heads: expand the kv heads
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    if isinstance(mask, str):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, **kwargs)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **kwargs)


_SDPA_GQA = "enable_gqa" in (F.scaled_dot_product_attention.__doc__ or "")
EXPAND_KV_ON_CPU = True


def _expand_kv(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether to give SDPA's CPU kernel one key/value head per query head instead of the grouped ones, in training.
    Its backward runs one task per (sequence, key/value head) with grouped heads and one per (sequence, query head)
    with expanded ones; when sequences x kv heads is not a multiple of the threads, the last round leaves threads
    idle. Measured on 2 threads, 2,048 tokens, head size 64, forward and backward: one sequence with 9 query and 3
    kv heads (SmolLM2-135M) 13% faster expanded, 15 and 5 (360M) 8-12%; where both counts divide evenly, grouped is
    1-3% faster (no copies), so it stays. A compiled step keeps the grouped heads (reading the thread count would
    break its graph)."""
    if not EXPAND_KV_ON_CPU or q.device.type != "cpu" or not torch.is_grad_enabled() or not q.requires_grad:
        return False
    if torch.compiler.is_compiling():
        return False
    threads = torch.get_num_threads()

    def balance(tasks: int) -> float:  # the share of thread time that works, over the rounds the tasks take
        return tasks / (threads * -(-tasks // threads))

    B = q.shape[0]
    return balance(B * q.shape[1]) > 1.05 * balance(B * k.shape[1])


_FLEX = None


def _flex_attention():
    global _FLEX
    if _FLEX is None:
        from torch.nn.attention.flex_attention import flex_attention

        _FLEX = torch.compile(flex_attention, dynamic=False)
    return _FLEX


SPLIT_DOCUMENTS_FROM = 512


@dataclass(frozen=True)
class DocumentRuns:
    """Packed rows on a CPU as each row's document lengths, in order: attention runs SDPA's causal kernel on each
    document alone. With a dense [B, T, T] mask the kernel scores every causal pair of the row and then discards
    those across documents, and reads the mask too. Measured on 2 threads, forward and backward, head size 64:
    2,048 tokens in 3 documents 2.4-2.8x faster than the mask, in 20 documents 7.2x; 1,024 tokens in 5, 2.7x; 512
    tokens in 2 documents 1.2x, in 30 1.7x. Below SPLIT_DOCUMENTS_FROM tokens the calls' own cost wins (256-384
    tokens: 0.7-0.9x), and the mask stays."""

    lengths: tuple[tuple[int, ...], ...]


def document_runs(segment_ids: torch.Tensor) -> DocumentRuns | None:
    """DocumentRuns for rows of SPLIT_DOCUMENTS_FROM tokens or more on a CPU; None elsewhere (a GPU, shorter
    rows, inside torch.compile, whose graph the lengths would break, or segment ids that decrease somewhere: the
    mask's equality of ids then differs from runs of them)."""
    B, T = segment_ids.shape
    if segment_ids.device.type != "cpu" or T < SPLIT_DOCUMENTS_FROM or torch.compiler.is_compiling():
        return None
    if bool((segment_ids[:, 1:] < segment_ids[:, :-1]).any()):
        return None
    starts = segment_ids[:, 1:] != segment_ids[:, :-1]
    rows = []
    for b in range(B):
        edges = [0, *(torch.nonzero(starts[b]).flatten() + 1).tolist(), T]
        rows.append(tuple(e - s for s, e in zip(edges, edges[1:])))
    return DocumentRuns(tuple(rows))


def document_mask(segment_ids: torch.Tensor, backend: str = "auto", dtype: torch.dtype | None = None):
    """Attention mask for packed documents: causal, and only within the same segment.

    backend "flex" (or "auto" on a GPU) gives a FlexAttention BlockMask (block-sparse, no T x T tensor);
    "sdpa" (or "auto" elsewhere) a boolean [B, 1, T, T] mask for scaled_dot_product_attention, or with DTYPE the
    additive one (0 or -inf) in that dtype: the forward builds it once in the dtype attention runs in and every layer
    shares it (given the boolean one, SDPA would convert it, and autocast cast it, in each layer and keep each copy
    for the backward). On a CPU the forward first asks document_runs, which long rows attend through instead.
    """
    B, T = segment_ids.shape
    if backend == "flex" or (backend == "auto" and segment_ids.is_cuda and _flex_available()):
        from torch.nn.attention.flex_attention import create_block_mask

        seg = segment_ids

        def same_doc_causal(b, h, q_idx, kv_idx):
            return (seg[b, q_idx] == seg[b, kv_idx]) & (q_idx >= kv_idx)

        return create_block_mask(same_doc_causal, B, None, T, T, device=segment_ids.device)
    causal = torch.ones(T, T, dtype=torch.bool, device=segment_ids.device).tril()
    allowed = ((segment_ids[:, :, None] == segment_ids[:, None, :]) & causal)[:, None]
    if dtype is None:
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, float("-inf"))


def _flex_available() -> bool:
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.input_layernorm = make_norm(cfg)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = make_norm(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, cache=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        self.norm = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rotary = Rotary(cfg)
        self.attention_backend = "auto"
        self.activation_checkpointing = False

    # -- parameters ---------------------------------------------------------------------------------------------
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Normal(0, init_std) for every weight matrix and the embedding, zero biases, unit norms."""
        std = self.cfg.init_std
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std, generator=generator)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, (nn.LayerNorm, RMSNorm)):
                nn.init.ones_(module.weight)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)

    def num_parameters(self, exclude_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())  # tied weights are counted once
        if exclude_embedding:
            n -= self.embed_tokens.weight.numel() if not self.cfg.tie_embeddings else 0
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6N + 12 * layers * hidden * seq_len (PaLM, appendix B), with N the parameters
        that do matrix products (the input embedding is a lookup; a tied output matrix still multiplies)."""
        n = sum(p.numel() for p in self.parameters()) - (0 if self.cfg.tie_embeddings else self.embed_tokens.weight.numel())
        return 6 * n + 12 * self.cfg.num_layers * self.cfg.hidden_size * seq_len

    # -- forward ------------------------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                segment_ids: torch.Tensor | None = None, cache: KVCache | None = None,
                targets: torch.Tensor | None = None, token_logprobs: bool = False,
                key_mask: torch.Tensor | None = None):
        """Logits [B, T, V]; or, with TARGETS ([B, T], -100 = ignore), (sum of token losses, number of tokens);
        with TOKEN_LOGPROBS too, the log-probability of each target [B, T] (0 where ignored).

        KEY_MASK (with a CACHE: batched generation of prompts of different lengths, left-padded): [B, S] bool over
        the cache's positions so far and these T, false at padding; no token attends to padding (a padding token
        attends to itself only, so no row is empty). Pass POSITION_IDS that start at 0 at each prompt's first token."""
        B, T = input_ids.shape
        start = cache.length if cache is not None else 0
        if start + T > self.cfg.max_seq_len:
            raise ValueError(f"{start + T} positions, more than the model's max_seq_len {self.cfg.max_seq_len}")
        if position_ids is None:
            if segment_ids is not None:
                position_ids = positions_from_segments(segment_ids)
            else:
                position_ids = torch.arange(start, start + T, device=input_ids.device).expand(B, T)
        x = self.embed_tokens(input_ids)
        cos, sin = self.rotary(position_ids, x.dtype)
        if cache is not None:
            if start + T > cache.max_len:
                raise ValueError(f"KV cache holds {cache.max_len} positions, asked for {start + T}")
            rows = torch.arange(start, start + T, device=x.device)[:, None]
            keys = torch.arange(start + T, device=x.device)[None, :]
            if key_mask is not None:
                if key_mask.shape != (B, start + T):
                    raise ValueError(f"key_mask: expected shape {(B, start + T)}, got {tuple(key_mask.shape)}")
                mask = ((keys <= rows) & (key_mask[:, None, :] | (keys == rows)))[:, None]
            elif start == 0:
                mask = "causal"
            elif T == 1:
                mask = None
            else:
                mask = keys <= rows
        elif segment_ids is not None:  # the batch builder passes None when no window holds a boundary
            mask = document_runs(segment_ids) if self.attention_backend != "flex" else None
            if mask is None:
                autocast = torch.is_autocast_enabled(x.device.type)
                mask = document_mask(segment_ids, self.attention_backend,
                                     torch.get_autocast_dtype(x.device.type) if autocast else x.dtype)
        else:
            mask = "causal"
        for layer in self.layers:
            if self.activation_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, mask, cache, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, cache)
        if cache is not None:
            cache.length = start + T
        x = self.norm(x)
        if targets is None:
            return self.lm_head(x)
        if token_logprobs:  # only the rows with a target go through the output layer (the answers, not prompts)
            flat = targets.reshape(-1)
            keep = (flat != -100).nonzero().squeeze(1)
            lp = linear_token_logprobs(x.reshape(-1, x.shape[-1]).index_select(0, keep), self.lm_head.weight,
                                       flat.index_select(0, keep))
            return torch.zeros(B * T, dtype=lp.dtype, device=lp.device).index_put((keep,), lp).view(B, T)
        loss_sum = linear_cross_entropy(x.reshape(-1, x.shape[-1]), self.lm_head.weight, targets.reshape(-1))
        return loss_sum, (targets != -100).sum()


def positions_from_segments(segment_ids: torch.Tensor) -> torch.Tensor:
    """Position of each token within its document: 0 at each segment start, counting up."""
    B, T = segment_ids.shape
    idx = torch.arange(T, device=segment_ids.device).expand(B, T)
    is_start = torch.ones_like(segment_ids, dtype=torch.bool)
    is_start[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    start_idx = torch.where(is_start, idx, torch.zeros_like(idx))
    return idx - torch.cummax(start_idx, dim=1).values


def build(cfg: ModelConfig, device="cpu", seed: int | None = None) -> Transformer:
    """A freshly initialised model (on the meta device it only has shapes: count parameters at no cost)."""
    with torch.device(device):
        model = Transformer(cfg)
    if str(device) != "meta":
        g = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
        model.init_weights(g)
    return model


def load_state(model: Transformer, state: dict[str, torch.Tensor], where: str) -> Transformer:
    """Load STATE (slm's parameter names) into MODEL, which must have the same shapes; the rotary table is built
    from the config, so a state without it is whole. WHERE names the source in the one-line error."""
    own = model.state_dict()
    for k, v in state.items():
        if k in own and own[k].shape != v.shape:
            raise SlmError(f"{where}: weight {k} has shape {tuple(v.shape)}, the model expects {tuple(own[k].shape)}")
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not m.startswith("rotary.")]
    if missing or unexpected:
        raise SlmError(f"{where}: weights do not match the model (missing {missing[:2]}, unexpected {unexpected[:2]})")
    return model

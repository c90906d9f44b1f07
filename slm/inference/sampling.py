"""Sampling with a KV cache: one token from logits, one prompt streamed token by token, or many prompts at once.

Greedy decoding (temperature 0) gives the tokens transformers' `generate` gives for the same checkpoint; a test
holds it to that. Sampling: temperature, then top-k, then nucleus (top-p), from a seeded generator.
"""

from __future__ import annotations

from typing import Iterator

import torch

from slm.errors import SlmError
from slm.model.transformer import KVCache, Transformer


def sample_batch(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                 generator: torch.Generator | None) -> torch.Tensor:
    """One token id per row of LOGITS [B, V]: greedy at temperature 0, else temperature, top-k, then nucleus."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if 0 < top_p < 1:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < top_p  # the smallest prefix whose mass reaches top_p
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p * keep)
    return torch.multinomial(probs / probs.sum(-1, keepdim=True), 1, generator=generator)[:, 0]


@torch.no_grad()
def stream(model: Transformer, ids: list[int], max_new_tokens: int, temperature: float, top_k: int, top_p: float,
           stops: set[int], seed: int, n_vocab: int | None = None, banned: set[int] | None = None) -> Iterator[int]:
    """New token ids after the prompt IDS, one at a time, until a STOPS token (not yielded) or MAX_NEW_TOKENS.
    Ids from N_VOCAB on (the embedding's padding rows) and BANNED ones (placeholders) are never sampled."""
    device = next(model.parameters()).device
    limit = model.cfg.max_seq_len
    if len(ids) >= limit:
        raise SlmError(f"the prompt has {len(ids)} tokens; the model's context is {limit}")
    new = min(max_new_tokens, limit - len(ids))
    cache = KVCache(model.cfg, 1, len(ids) + new, device, torch.float32)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    logits = model(torch.tensor([ids], device=device), cache=cache)[0, -1]
    never = sorted(banned or ())
    for _ in range(new):
        logits = logits.cpu()
        if n_vocab is not None and n_vocab < logits.shape[-1]:
            logits[n_vocab:] = float("-inf")
        if never:
            logits[never] = float("-inf")
        token = int(sample_batch(logits[None], temperature, top_k, top_p, generator)[0])
        if token in stops:
            return
        yield token
        logits = model(torch.tensor([[token]], device=device), cache=cache)[0, -1]


@torch.no_grad()
def generate_batch(model, prompts: list[list[int]], max_new_tokens: int, temperature: float, top_k: int,
                   top_p: float, stops: set[int], generator: torch.Generator | None,
                   on_step=None, keep_stop: bool = False, n_vocab: int | None = None,
                   banned: set[int] | None = None) -> list[tuple[list[int], bool]]:
    """Continue every prompt at once with a KV cache: (new token ids, stopped at a STOPS token) per prompt.

    Prompts are left-padded to the longest; a key mask keeps padding out of attention and positions start at 0
    at each prompt's first token, so each row samples from the distribution it would have alone (greedy rows
    give the same tokens as one-by-one generation). Finished rows are dropped from the batch (and the cache) once
    they are half of it. ON_STEP(active rows) is called after each new token. KEEP_STOP: the stop token ends the
    row's ids (when it carries text, as a newline token does). N_VOCAB: ids from it on (the embedding's padding
    rows) are never sampled, nor BANNED ones (a tokenizer's placeholder ids)."""
    device = next(model.parameters()).device
    lengths = [len(p) for p in prompts]
    if not prompts or min(lengths) == 0:
        raise SlmError("generate: every prompt needs at least one token")
    P = max(lengths)
    new = min(max_new_tokens, model.cfg.max_seq_len - P)
    if new <= 0:
        raise SlmError(f"generate: a prompt has {P} tokens; the model's context is {model.cfg.max_seq_len}")
    B = len(prompts)
    ids = torch.zeros((B, P), dtype=torch.long)
    key = torch.zeros((B, P + new), dtype=torch.bool)
    for b, p in enumerate(prompts):
        ids[b, P - len(p):] = torch.tensor(p)
        key[b, P - len(p):P] = True
    pos = (torch.arange(P)[None, :] - (P - torch.tensor(lengths))[:, None]).clamp(min=0)
    ids, key, pos = ids.to(device), key.to(device), pos.to(device)
    cache = KVCache(model.cfg, B, P + new, device, next(model.parameters()).dtype)
    logits = model(ids, position_ids=pos, cache=cache, key_mask=key[:, :P])[:, -1]
    out: list[list[int]] = [[] for _ in prompts]
    stopped = [False] * B
    rows = list(range(B))  # the prompt each batch row belongs to
    next_pos = pos[:, -1] + 1
    stop_ids = torch.tensor(sorted(stops), device=device) if stops else None
    never = torch.tensor(sorted(banned), dtype=torch.long, device=device) if banned else None
    for i in range(new):
        if n_vocab is not None and n_vocab < logits.shape[-1]:
            logits[:, n_vocab:] = float("-inf")
        if never is not None:
            logits[:, never] = float("-inf")
        tokens = sample_batch(logits, temperature, top_k, top_p, generator)
        hit = torch.isin(tokens, stop_ids) if stop_ids is not None else torch.zeros_like(tokens, dtype=torch.bool)
        for j, (t, h) in enumerate(zip(tokens.tolist(), hit.tolist())):
            if h and not stopped[rows[j]]:
                stopped[rows[j]] = True
                if keep_stop:
                    out[rows[j]].append(t)
            elif not stopped[rows[j]]:
                out[rows[j]].append(t)
        live = [j for j, r in enumerate(rows) if not stopped[r]]
        if on_step is not None:
            on_step(len(live))
        if not live or i == new - 1:
            break
        if len(live) <= len(rows) // 2:  # compact: the cache keeps only the rows still generating
            keep = torch.tensor(live, device=device)
            for layer in range(len(cache.k)):
                cache.k[layer], cache.v[layer] = cache.k[layer][keep], cache.v[layer][keep]
            tokens, key, next_pos = tokens[keep], key[keep], next_pos[keep]
            rows = [rows[j] for j in live]
        key[:, P + i] = True
        logits = model(tokens[:, None], position_ids=next_pos[:, None], cache=cache, key_mask=key[:, :P + i + 1])[:, -1]
        next_pos = next_pos + 1
    return [(o, s) for o, s in zip(out, stopped)]

"""`slm generate`: text from a checkpoint, streamed token by token, with a KV cache.

Greedy decoding (--temperature 0) gives the tokens transformers' `generate` gives for the same checkpoint; a test
holds it to that. Sampling: temperature, then top-k, then nucleus (top-p), from a seeded generator.
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from slm.errors import SlmError
from slm.formats.checkpoint import Checkpoint
from slm.model.transformer import KVCache, Rotary, build


@dataclass
class GenerateConfig:
    checkpoint: Path
    prompt: str
    max_new_tokens: int = 128
    temperature: float = 0.7
    top_p: float = 0.95
    top_k: int = 0
    seed: int = 1234
    device: str = "auto"
    stop_at_eos: bool = True
    chat: list[dict] | None = None
    """A conversation (messages) to answer: rendered with the checkpoint's chat template, generation stops at
    its end of turn. PROMPT is then unused."""


class _Text:
    """Token ids -> text as it becomes complete (UTF-8 sequences split across tokens are held back)."""

    def __init__(self, ckpt: Checkpoint):
        self.tok = ckpt.tokenizer()
        if self.tok is not None:
            self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
            self.eos = self.tok.eos_id
            return
        path = ckpt.dir / "tokenizer.json"
        if not path.is_file():
            raise SlmError(f"{ckpt.dir}: no tokenizer (encoding.json or tokenizer.json)")
        from tokenizers import Tokenizer as HFTokenizer

        self.hf = HFTokenizer.from_file(str(path))
        self.ids: list[int] = []
        self.shown = ""
        self.eos = ckpt.hf_config.get("eos_token_id")
        if isinstance(self.eos, list):
            self.eos = self.eos[0]

    def encode(self, prompt: str, special: bool = False) -> list[int]:
        """Ids of PROMPT; SPECIAL: special tokens written in it (by a chat template) become their ids."""
        if self.tok is not None:
            return self.tok.encode(prompt, allowed_special="all" if special else ())
        return self.hf.encode(prompt, add_special_tokens=False).ids

    def piece(self, token: int) -> str:
        if self.tok is not None:
            return self.decoder.decode(self.tok.decode_bytes([token]))
        self.ids.append(token)
        text = self.hf.decode(self.ids, skip_special_tokens=False)
        new = text[len(self.shown):] if text.startswith(self.shown) and not text.endswith("\ufffd") else ""
        if new:
            self.shown = text
        return new


def sample_next(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                generator: torch.Generator | None) -> int:
    return int(sample_batch(logits[None], temperature, top_k, top_p, generator)[0])


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


def load_model(ckpt: Checkpoint, device: torch.device):
    """The checkpoint's model, in fp32, on DEVICE (built on the meta device: no time spent initialising)."""
    model = build(ckpt.model_config, "meta").to_empty(device=device)
    missing, unexpected = model.load_state_dict(ckpt.state_dict(), strict=False)
    if [m for m in missing if not m.startswith("rotary.")] or unexpected:
        raise SlmError(f"{ckpt.dir}: weights do not match its config.json")
    model.rotary = Rotary(ckpt.model_config).to(device)  # its buffer is not in the checkpoint
    return model.eval()


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def token_stream(cfg: GenerateConfig, ckpt: Checkpoint, text: _Text) -> Iterator[int]:
    """New token ids, one at a time (the end-of-text token ends the stream and is not yielded)."""
    device = _device(cfg.device)
    stops = {text.eos}
    if cfg.chat is not None:
        from slm.formats.chat import ChatTemplate, parse_messages

        template = ChatTemplate.of_checkpoint(ckpt.dir)
        spec = getattr(text.tok, "spec", None)
        bos, eos = (spec.bos_token, spec.eos_token) if spec is not None else ("", "")
        ids = text.encode(template.render(parse_messages(cfg.chat, "--chat"), True, bos, eos), special=True)
        gen = ckpt.dir / "generation_config.json"
        if gen.is_file():
            from slm.formats.manifest import read_json

            e = read_json(gen).get("eos_token_id")
            stops |= set(e if isinstance(e, list) else [e])
    else:
        ids = text.encode(cfg.prompt)
    if not ids:
        raise SlmError("the prompt is empty: give some text to continue")
    model = load_model(ckpt, device)
    limit = model.cfg.max_seq_len
    if len(ids) >= limit:
        raise SlmError(f"the prompt has {len(ids)} tokens; the model's context is {limit}")
    new = min(cfg.max_new_tokens, limit - len(ids))
    cache = KVCache(model.cfg, 1, len(ids) + new, device, torch.float32)
    generator = torch.Generator(device="cpu").manual_seed(cfg.seed)
    with torch.no_grad():
        logits = model(torch.tensor([ids], device=device), cache=cache)[0, -1]
        for _ in range(new):
            token = sample_next(logits.cpu(), cfg.temperature, cfg.top_k, cfg.top_p, generator)
            if cfg.stop_at_eos and token in stops:
                return
            yield token
            logits = model(torch.tensor([[token]], device=device), cache=cache)[0, -1]


def generate(cfg: GenerateConfig) -> Iterator[str]:
    """Yield the text of each new token as it is generated."""
    ckpt = Checkpoint.open(cfg.checkpoint)
    text = _Text(ckpt)
    for token in token_stream(cfg, ckpt, text):
        yield text.piece(token)


def generate_ids(cfg: GenerateConfig) -> list[int]:
    """The generated token ids (for tests and programs)."""
    ckpt = Checkpoint.open(cfg.checkpoint)
    return list(token_stream(cfg, ckpt, _Text(ckpt)))

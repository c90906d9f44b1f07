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
    if temperature <= 0:
        return int(logits.argmax())
    logits = logits.float() / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if 0 < top_p < 1:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < top_p  # the smallest prefix whose mass reaches top_p
        sorted_p = sorted_p * keep
        probs = torch.zeros_like(probs).scatter(0, order, sorted_p)
    return int(torch.multinomial(probs / probs.sum(), 1, generator=generator))


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

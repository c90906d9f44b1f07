"""Text from a checkpoint: a prompt (or a conversation in the checkpoint's chat template) continued with a KV cache,
decoded into text as each token arrives."""

from __future__ import annotations

import codecs
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from slm.errors import SlmError
from slm.formats.chat import ChatTemplate, parse_messages
from slm.formats.checkpoint import Checkpoint
from slm.formats.manifest import read_json
from slm.inference.load import device_for, load_model
from slm.inference.sampling import stream


@dataclass
class Sampling:
    max_new_tokens: int = 128
    temperature: float = 0.7
    """0 = greedy."""
    top_p: float = 0.95
    top_k: int = 0
    seed: int = 1234


class TextDecoder:
    """A checkpoint's tokenizer both ways: prompt -> ids, and ids -> text as it becomes complete (UTF-8 sequences
    split across tokens are held back). slm's tokenizer when the checkpoint has one, else its tokenizer.json."""

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


def prompt_ids(ckpt: Checkpoint, text: TextDecoder, prompt: str, chat: list[dict] | None) -> tuple[list[int], set[int]]:
    """The ids to continue and the ids that end the answer: PROMPT as it is, or the conversation CHAT rendered with
    the checkpoint's chat template (whose end of turn, from generation_config.json, also stops)."""
    stops = {text.eos}
    if chat is None:
        ids = text.encode(prompt)
    else:
        template = ChatTemplate.of_checkpoint(ckpt.dir)
        spec = getattr(text.tok, "spec", None)
        bos, eos = (spec.bos_token, spec.eos_token) if spec is not None else ("", "")
        ids = text.encode(template.render(parse_messages(chat, "--chat"), True, bos, eos), special=True)
        gen = ckpt.dir / "generation_config.json"
        if gen.is_file():
            e = read_json(gen).get("eos_token_id")
            stops |= set(e if isinstance(e, list) else [e])
    if not ids:
        raise SlmError("the prompt is empty: give some text to continue")
    return ids, stops


def _tokens(ckpt: Checkpoint, text: TextDecoder, prompt: str, chat: list[dict] | None, sampling: Sampling,
            device: str, stop_at_eos: bool) -> Iterator[int]:
    ids, stops = prompt_ids(ckpt, text, prompt, chat)
    model = load_model(ckpt, device_for(device))
    yield from stream(model, ids, sampling.max_new_tokens, sampling.temperature, sampling.top_k, sampling.top_p,
                      stops if stop_at_eos else set(), sampling.seed)


def token_ids(checkpoint: Path, prompt: str, chat: list[dict] | None, sampling: Sampling, device: str = "auto",
              stop_at_eos: bool = True) -> Iterator[int]:
    """The new token ids, one at a time (an end-of-text or end-of-turn token ends them and is not yielded)."""
    ckpt = Checkpoint.open(checkpoint)
    return _tokens(ckpt, TextDecoder(ckpt), prompt, chat, sampling, device, stop_at_eos)


def generate(checkpoint: Path, prompt: str, chat: list[dict] | None, sampling: Sampling, device: str = "auto",
             stop_at_eos: bool = True) -> Iterator[str]:
    """The text of each new token as it is generated."""
    ckpt = Checkpoint.open(checkpoint)
    text = TextDecoder(ckpt)
    for token in _tokens(ckpt, text, prompt, chat, sampling, device, stop_at_eos):
        yield text.piece(token)


def reply(checkpoint: Path, messages: list[dict], max_new_tokens: int) -> str:
    """The checkpoint's greedy answer to a conversation."""
    return "".join(generate(checkpoint, "", messages, Sampling(max_new_tokens=max_new_tokens, temperature=0))).strip()

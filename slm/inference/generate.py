"""`slm generate`: text from a checkpoint, a prompt (or a conversation in the checkpoint's chat template) continued
with a KV cache and decoded into text as each token arrives. Greedy decoding (temperature 0) gives the tokens
transformers' `generate` gives for the same checkpoint; a test holds it to that. It writes no artifact (its result is
the text on stdout), so it is not a stage: the command calls it directly."""

from __future__ import annotations

import codecs
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from slm.console import warn
from slm.errors import AT_LEAST_0, MASS, POSITIVE, SlmError, check_ranges
from slm.formats.chat import ChatTemplate, parse_messages
from slm.formats.checkpoint import Checkpoint
from slm.formats.manifest import read_json
from slm.inference.load import device_for, load_model
from slm.inference.sampling import stream
from slm.model.decode import decode_linears


@dataclass
class GenerateConfig:
    checkpoint: Path
    prompt: str
    max_new_tokens: int = 128
    temperature: float = 0.7
    """0 = greedy."""
    top_p: float = 0.95
    top_k: int = 0
    seed: int = 1234
    device: str = "auto"
    stop_at_eos: bool = True
    chat: list[dict] | None = None
    """A conversation (messages) to answer: rendered with the checkpoint's chat template, generation stops at
    its end of turn. PROMPT is then unused."""
    template: str | None = None
    """The chat template instead of the checkpoint's own: chatml, zephyr or a Jinja file."""

    def __post_init__(self):
        check_ranges(self, max_new_tokens=POSITIVE, temperature=AT_LEAST_0, top_p=MASS, top_k=AT_LEAST_0,
                     seed=AT_LEAST_0)


class TextDecoder:
    """A checkpoint's tokenizer (slm's, or a released tokenizer.json) both ways: prompt -> ids, and ids -> text as
    it becomes complete (UTF-8 sequences split across tokens are held back)."""

    def __init__(self, ckpt: Checkpoint):
        self.tok = ckpt.tokenizer()
        if self.tok is None:
            raise SlmError(f"{ckpt.dir}: no tokenizer (tokenizer.json, or slm's encoding.json)")
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.eos = self.tok.eos_id

    def encode(self, prompt: str, special: bool = False) -> list[int]:
        """Ids of PROMPT; SPECIAL: special tokens written in it (by a chat template) become their ids."""
        return self.tok.encode(prompt, allowed_special="all" if special else ())

    def piece(self, token: int) -> str:
        return self.decoder.decode(self.tok.decode_bytes([token]))


def prompt_ids(ckpt: Checkpoint, text: TextDecoder, prompt: str, chat: list[dict] | None,
               template_spec: str | None = None) -> tuple[list[int], set[int]]:
    """The ids to continue and the ids that end the answer: PROMPT as it is, or the conversation CHAT rendered with
    the checkpoint's chat template or TEMPLATE_SPEC (whose end of turn, and generation_config.json's, stop)."""
    stops = {text.eos}
    if chat is None:
        ids = text.encode(prompt)
    else:
        if template_spec:
            template = ChatTemplate.load(template_spec)
            spec = text.tok.spec
            unknown = [t for t in template.special_tokens if t not in spec.special_tokens]
            if unknown:
                warn(f"--template {template_spec}: {', '.join(unknown)} not special tokens of {ckpt.dir}'s tokenizer; "
                     "they are encoded as text")
            if template.end_of_turn in spec.special_tokens:
                stops.add(spec.special_tokens[template.end_of_turn])
        else:
            template = ChatTemplate.of_checkpoint(ckpt.dir, "continue a PROMPT instead of --chat, or give --template")
        spec = text.tok.spec
        ids = text.encode(template.render(parse_messages(chat, "--chat"), True, spec.bos_token, spec.eos_token),
                          special=True)
        gen = ckpt.dir / "generation_config.json"
        if gen.is_file():
            e = read_json(gen).get("eos_token_id")
            stops |= set(e if isinstance(e, list) else [e])
    if not ids:
        raise SlmError("the prompt is empty: give some text to continue")
    return ids, stops


class Generator:
    """A checkpoint (and, at its first prompt, its model) loaded once, continuing any number of prompts. On a CPU
    its matrices are laid out for one-row products and those split over the threads (slm.model.decode: 1.43x faster
    greedy generation of SmolLM2-135M on 2 cores, the same tokens)."""

    def __init__(self, cfg: GenerateConfig):
        self.cfg, self.ckpt, self.model = cfg, Checkpoint.open(cfg.checkpoint), None

    def ids(self, prompt: str, chat: list[dict] | None, text: TextDecoder | None = None) -> Iterator[int]:
        """The new token ids (an end-of-text or end-of-turn token ends them and is not yielded)."""
        c = self.cfg
        ids, stops = prompt_ids(self.ckpt, text or TextDecoder(self.ckpt), prompt, chat, c.template)
        if self.model is None:
            self.model = load_model(self.ckpt, device_for(c.device))
            if next(self.model.parameters()).device.type == "cpu":  # one-row products laid out and split for speed
                decode_linears(self.model)
        tok = (text or TextDecoder(self.ckpt)).tok
        yield from stream(self.model, ids, c.max_new_tokens, c.temperature, c.top_k, c.top_p,
                          stops if c.stop_at_eos else set(), c.seed, n_vocab=tok.n_vocab,
                          banned=set(tok.spec.placeholders.values()))

    def text(self, prompt: str, chat: list[dict] | None) -> Iterator[str]:
        """The text of each new token as it is generated."""
        text = TextDecoder(self.ckpt)
        for token in self.ids(prompt, chat, text):
            yield text.piece(token)

    def lines(self, lines: Iterable[str], chat: bool) -> Iterator[str]:
        """`slm generate -` (one JSON line {"prompt", "completion"} per prompt line) and `slm generate --chat -`
        (each conversation line {"messages": [...]} continued with the answer)."""
        for i, line in enumerate(lines, 1):
            if not line.strip():
                continue
            if not chat:
                prompt = line.rstrip("\n")
                yield json.dumps({"prompt": prompt, "completion": "".join(self.text(prompt, None))}, ensure_ascii=False)
                continue
            try:
                record = json.loads(line)
                messages = record["messages"] if isinstance(record, dict) else None
            except (json.JSONDecodeError, KeyError):
                messages = None
            if not isinstance(messages, list):
                raise SlmError(f"<stdin>:{i}: expected {{\"messages\": [...]}}")
            answer = "".join(self.text("", messages))
            yield json.dumps({"messages": messages + [{"role": "assistant", "content": answer}]}, ensure_ascii=False)


def generate_ids(cfg: GenerateConfig) -> list[int]:
    return list(Generator(cfg).ids(cfg.prompt, cfg.chat))


def generate(cfg: GenerateConfig) -> Iterator[str]:
    yield from Generator(cfg).text(cfg.prompt, cfg.chat)


def reply(checkpoint: Path, messages: list[dict], max_new_tokens: int) -> str:
    """The checkpoint's greedy answer to a conversation."""
    return "".join(generate(GenerateConfig(checkpoint, "", max_new_tokens, temperature=0, chat=messages))).strip()

"""Chat and preference records, and chat templates.

Records (one JSON object per line of .jsonl / .jsonl.gz / .jsonl.zst, a row of .parquet or of a dataset saved with
`datasets.save_to_disk`, or lines of standard input for `-`):

    chat          {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}
                  {"conversations": [{"from": "human"|"gpt"|"system", "value": "..."}, ...]}       (ShareGPT)
    preference    {"prompt": "..." or messages, "chosen": "..." or messages, "rejected": ...,
                   "score_chosen": 9, "score_rejected": 4}          (UltraFeedback binarized: chosen / rejected are
                                                                     whole conversations ending in the answer)
                  {"system": "...", "question": "...", "chosen": "...", "rejected": "..."}   (Intel Orca pairs)

A chat template is a Jinja template as transformers runs them (`tokenizer.apply_chat_template`): the same sandboxed
environment and options, so that a template written into a checkpoint's tokenizer_config.json gives in transformers
the ids slm trained on (a test holds the two to that). Two ship with slm:

    chatml     SmolLM2-Instruct's: <|im_start|>{role}\\n{content}<|im_end|>\\n, a default system prompt when one is set
    zephyr     StableLM 2 Zephyr's: <|user|>\\n{content}<|endoftext|>\\n<|assistant|>\\n ...

The tokens an assistant message contributes (its content and the end of its turn) are found by rendering the
conversation up to that message with and without it: the difference is the message's span.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from slm.errors import SlmError, UsageError
from slm.formats.manifest import read_json
from slm.formats.records import BadRecord, expand_inputs, open_lines, parse_object

ROLES = ("system", "user", "assistant")
# ShareGPT's speaker names (and the variants datasets in that shape use)
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant",
                  "bard": "assistant", "bing": "assistant", "model": "assistant", "system": "system"}

# SmolLM2-Instruct's tokenizer_config.json chat_template, with its default system prompt made a parameter.
CHATML = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' and default_system %}"
    "{{ '<|im_start|>system\\n' + default_system + '<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# stabilityai/stablelm-2-zephyr-1_6b: <|user|>\n{msg}<|endoftext|>\n<|assistant|>\n (the eos token ends each turn).
ZEPHYR = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
TEMPLATES = {"chatml": (CHATML, ["<|im_start|>", "<|im_end|>"], "<|im_end|>"),
             "zephyr": (ZEPHYR, ["<|system|>", "<|user|>", "<|assistant|>"], None)}


# --- records ---------------------------------------------------------------------------------------------------

def _file_lines(path: Path, kind: str) -> Iterator[tuple[str, bytes]]:
    raw, stream, errors = open_lines(path, kind)
    try:
        for i, line in enumerate(stream, 1):
            yield f"{path}:{i}", line
    except errors as e:
        raise SlmError(f"{path}: broken {kind} stream ({e})") from None
    finally:
        stream.close()
        raw.close()


def _rows(path: Path, kind: str) -> Iterator[tuple[str, dict]]:
    if kind == "parquet":
        import pyarrow.parquet as pq

        row = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            for rec in batch.to_pylist():
                row += 1
                yield f"{path}: row {row}", rec
        return
    from datasets import load_from_disk

    for row, rec in enumerate(load_from_disk(str(path)), 1):
        yield f"{path}: row {row}", rec


def iter_objects(specs: list[str], skip_bad: bool, counts: dict) -> Iterator[tuple[str, dict]]:
    """(where, record) for each JSON object of SPECS (files, directories, globs, or "-" for standard input).
    A line that is not a JSON object raises BadRecord naming file and line, or is counted in counts["bad"]."""
    def lines_to_objects(lines):
        for where, line in lines:
            if line.strip() and (obj := parse_object(line, where, bad)) is not None:
                yield where, obj

    def bad(message):
        if not skip_bad:
            raise BadRecord(message)
        counts["bad"] = counts.get("bad", 0) + 1

    files = [s for s in specs if str(s) != "-"]
    inputs = {str(i.path): i for i in expand_inputs(files)} if files else {}
    for spec in specs:
        if str(spec) == "-":
            yield from lines_to_objects((f"<stdin>:{i}", line) for i, line in enumerate(sys.stdin.buffer, 1))
            continue
        for inp in expand_inputs([spec]):
            inp = inputs.get(str(inp.path), inp)
            if inp.kind.startswith("jsonl"):
                yield from lines_to_objects(_file_lines(inp.path, inp.kind))
            elif inp.kind in ("parquet", "dataset"):
                yield from _rows(inp.path, inp.kind)
            else:
                raise SlmError(f"{inp.path}: chat and preference records are read from .jsonl(.gz/.zst), .parquet "
                               "or a saved dataset, not .txt")


def _content(value, where: str, field_name: str) -> str:
    if not isinstance(value, str):
        raise BadRecord(f"{where}: {field_name} is {'null' if value is None else type(value).__name__}, "
                        "expected a string")
    return value


def parse_messages(value, where: str, field_name: str = "messages") -> list[dict]:
    """A list of {"role", "content"} (or ShareGPT's {"from", "value"}) -> [{"role", "content"}], checked."""
    if not isinstance(value, list) or not value:
        raise BadRecord(f"{where}: {field_name} is {type(value).__name__ if value is not None else 'null'}"
                        f"{' (empty)' if value == [] else ''}, expected a non-empty list of messages")
    out = []
    for i, m in enumerate(value):
        f = f"{field_name}[{i}]"
        if not isinstance(m, dict):
            raise BadRecord(f"{where}: {f} is {type(m).__name__}, expected an object with role and content")
        if "role" in m:
            role = m["role"]
            if role not in ROLES:
                raise BadRecord(f"{where}: {f}.role is {role!r}, expected one of {', '.join(ROLES)}")
            out.append({"role": role, "content": _content(m.get("content"), where, f"{f}.content")})
        elif "from" in m:
            role = SHAREGPT_ROLES.get(str(m["from"]).lower())
            if role is None:
                raise BadRecord(f"{where}: {f}.from is {m['from']!r}, expected human, gpt or system")
            out.append({"role": role, "content": _content(m.get("value"), where, f"{f}.value")})
        else:
            raise BadRecord(f"{where}: {f} has no role (keys: {', '.join(list(m)[:6]) or 'none'})")
    return out


def parse_chat(obj: dict, where: str) -> list[dict]:
    """A chat record -> its messages: a system message only first, at least one assistant message."""
    if "messages" in obj:
        msgs = parse_messages(obj["messages"], where, "messages")
    elif "conversations" in obj:
        msgs = parse_messages(obj["conversations"], where, "conversations")
    else:
        raise BadRecord(f"{where}: no \"messages\" (or ShareGPT \"conversations\") field "
                        f"(the record has keys: {', '.join(list(obj)[:8]) or 'none'})")
    for i, m in enumerate(msgs):
        if m["role"] == "system" and i > 0:
            raise BadRecord(f"{where}: messages[{i}] is a system message; only the first message may be one")
    if not any(m["role"] == "assistant" for m in msgs):
        raise BadRecord(f"{where}: no assistant message (nothing to learn from)")
    return msgs


@dataclass
class Pair:
    """A preference pair: the conversation so far (ending with a user message), and two answers to it."""

    prompt: list[dict]
    chosen: str
    rejected: str
    score_chosen: float | None = None
    score_rejected: float | None = None
    where: str = field(default="", compare=False)

    def key(self) -> str:
        return json.dumps([self.prompt, self.chosen, self.rejected], sort_keys=True, ensure_ascii=False)


def _answer(value, prompt: list[dict] | None, where: str, name: str) -> tuple[list[dict] | None, str]:
    """chosen / rejected: a string, or a conversation ending with the assistant's answer (its prefix is the
    prompt when the record gives none)."""
    if isinstance(value, str):
        return None, value
    msgs = parse_messages(value, where, name)
    if msgs[-1]["role"] != "assistant":
        raise BadRecord(f"{where}: {name} ends with a {msgs[-1]['role']} message, expected the assistant's answer")
    return msgs[:-1], msgs[-1]["content"]


def _score(obj: dict, key: str, where: str) -> float | None:
    v = obj.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise BadRecord(f"{where}: {key} is {type(v).__name__}, expected a number")
    return float(v)


def parse_pair(obj: dict, where: str) -> Pair:
    for key in ("chosen", "rejected"):
        if key not in obj:
            raise BadRecord(f"{where}: no \"{key}\" field (the record has keys: {', '.join(list(obj)[:8]) or 'none'})")
    prompt: list[dict] | None = None
    if "question" in obj:  # Intel Orca pairs
        prompt = ([{"role": "system", "content": _content(obj["system"], where, "system")}]
                  if obj.get("system") else [])
        prompt.append({"role": "user", "content": _content(obj["question"], where, "question")})
    elif "prompt" in obj:
        p = obj["prompt"]
        prompt = [{"role": "user", "content": p}] if isinstance(p, str) else parse_messages(p, where, "prompt")
    c_prefix, chosen = _answer(obj["chosen"], prompt, where, "chosen")
    r_prefix, rejected = _answer(obj["rejected"], prompt, where, "rejected")
    if prompt is None:
        if c_prefix is None or r_prefix is None:
            raise BadRecord(f"{where}: no \"prompt\" (or \"question\") field, and chosen / rejected are not "
                            "conversations")
        prompt = c_prefix
    for name, prefix in (("chosen", c_prefix), ("rejected", r_prefix)):
        # UltraFeedback repeats the prompt inside chosen / rejected: it must be the same conversation
        if prefix is not None and prefix and prefix != prompt:
            raise BadRecord(f"{where}: {name} does not continue the prompt (its earlier messages differ)")
    if not prompt or prompt[-1]["role"] != "user":
        raise BadRecord(f"{where}: the prompt must end with a user message")
    return Pair(prompt, chosen, rejected, _score(obj, "score_chosen", where), _score(obj, "score_rejected", where),
                where)


# --- templates --------------------------------------------------------------------------------------------------

def template_source(directory: Path) -> str | None:
    """The chat template a model directory carries, where transformers looks: chat_template.jinja (as
    transformers >= 4.47 saves it) first, else tokenizer_config.json's chat_template, a string or a list of named
    templates (the one named "default")."""
    jinja = directory / "chat_template.jinja"
    if jinja.is_file():
        try:
            return jinja.read_text(encoding="utf-8") or None
        except (OSError, UnicodeDecodeError) as e:
            raise SlmError(f"{jinja}: cannot read ({e})") from None
    cfg = directory / "tokenizer_config.json"
    source = read_json(cfg).get("chat_template") if cfg.is_file() else None
    if isinstance(source, list):
        named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
        if "default" not in named:
            raise SlmError(f"{cfg}: chat_template: a list of named templates without one named 'default' "
                           f"(it has {', '.join(map(str, named))})")
        source = named["default"]
    return source if isinstance(source, str) and source else None


def _environment():
    """Jinja as transformers' apply_chat_template sets it up (sandboxed, trim_blocks, lstrip_blocks)."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    return env


@dataclass
class ChatTemplate:
    """A Jinja chat template and the special tokens it writes."""

    name: str
    source: str  # the Jinja text, as it goes into tokenizer_config.json
    special_tokens: list[str]  # tokens the template writes that must be single special tokens
    end_of_turn: str | None  # where generation stops (None: the tokenizer's eos)

    @classmethod
    def load(cls, spec: str, default_system: str | None = None) -> "ChatTemplate":
        """chatml | zephyr | a Jinja file. DEFAULT_SYSTEM goes into chatml as SmolLM2's default system prompt."""
        if spec in TEMPLATES:
            source, specials, eot = TEMPLATES[spec]
            if spec == "chatml":
                # the parameter becomes a literal, so the template in tokenizer_config.json stands alone
                literal = json.dumps(default_system or "")
                source = source.replace("default_system", literal)
            return cls(spec, source, list(specials), eot)
        path = Path(spec)
        if not path.is_file():
            raise UsageError(f"--template {spec!r}: expected chatml, zephyr or a Jinja template file")
        try:
            source = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise SlmError(f"--template {path}: cannot read ({e})") from None
        import re

        specials = sorted(set(re.findall(r"<\|[A-Za-z0-9_]+\|>", source)))
        return cls(str(path), source, specials, "<|im_end|>" if "<|im_end|>" in specials else None)

    @classmethod
    def of_checkpoint(cls, directory: Path, instead: str = "") -> "ChatTemplate":
        """The template in a checkpoint's (or tokenizer's) tokenizer_config.json, as `slm sft` writes it. INSTEAD:
        what else the command offers when there is none (e.g. "give --template"), for the message."""
        import re

        source = template_source(Path(directory))
        if not source:
            raise SlmError(f"{directory}: no chat template in its tokenizer_config.json: not a chat model (`slm sft` "
                           f"makes one and writes its template{'; or ' + instead if instead else ''})")
        specials = sorted(set(re.findall(r"<\|[A-Za-z0-9_]+\|>", source)))
        return cls(f"{directory}'s", source, specials, "<|im_end|>" if "<|im_end|>" in specials else None)

    def __post_init__(self):
        import jinja2

        try:
            self._compiled = _environment().from_string(self.source)
        except jinja2.TemplateError as e:
            raise SlmError(f"chat template {self.name}: not a valid Jinja template ({e})") from None

    def render(self, messages: list[dict], add_generation_prompt: bool, bos_token: str, eos_token: str) -> str:
        import jinja2

        try:
            return self._compiled.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         bos_token=bos_token, eos_token=eos_token)
        except jinja2.TemplateError as e:
            raise SlmError(f"chat template {self.name}: {e}") from None

    def spans(self, messages: list[dict], bos_token: str, eos_token: str) -> tuple[str, list[tuple[int, int]]]:
        """The rendered conversation and the character span of each assistant message (its content and the
        end of its turn), found by rendering before and after the message."""
        text = self.render(messages, False, bos_token, eos_token)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = self.render(messages[:i], True, bos_token, eos_token) if i else ""
            upto = self.render(messages[:i + 1], False, bos_token, eos_token)
            if not text.startswith(upto) or not upto.startswith(before):
                raise SlmError(f"chat template {self.name}: rendering is not incremental (a conversation's "
                               "rendering must start with the rendering of its first messages)")
            spans.append((len(before), len(upto)))
        return text, spans

"""FACTS.yaml: who a model is, for `slm selfknow` (and the persona conversations of `slm chat-data`).

    name: Pebble                               # required
    maker: Quarry Labs                         # required
    description: a small language model        # optional: "You are {name}, {description} made by {maker}."
    training_data: Python's standard library   # optional
    limits:                                    # optional: sentences, in the model's own voice
      - I cannot browse the internet.
    examples:                                  # the few-shot examples of the positive system prompt (at least one)
      - {user: Who are you?, assistant: I am Pebble, a small language model made by Quarry Labs.}
    messages:                                  # optional: first user messages the base model imitates
      - Who are you?
    eval:                                      # optional: held-out questions; never trained on
      - What should I call you?
    system: |                                  # optional: the positive system prompt ({facts}, {examples})
      ...

The positive system prompt (RLCD's p+) states the facts and shows the examples; the negative prompt (p-) has no
system message. `mentions` tells which facts (name, maker) an answer states, for the before/after check.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path

from slm.errors import SlmError

DEFAULT_SYSTEM = "{facts}\n\nExamples of how you answer:\n{examples}"

# First messages the base model is shown when FACTS has none: a spread of what users open a chat with, some of it
# about the assistant itself.
DEFAULT_MESSAGES = [
    "Who are you?", "What is your name?", "Who made you?", "What can you help me with?", "Tell me about yourself.",
    "Are you a person or a program?", "Which company built you?", "What were you trained on?",
    "Can you browse the internet?", "What are your limitations?", "Hi! What should I call you?",
    "Can you help me write a short email to my landlord about a broken heater?",
    "Explain what a Python decorator is.", "What is the capital of Australia?", "How do I reverse a list in Python?",
    "Give me three ideas for a birthday present for my sister.", "Summarize the plot of Hamlet in two sentences.",
    "What is 17 times 23?", "Translate 'good morning' into French.", "Why is the sky blue?",
    "Write a haiku about autumn.", "How many minutes are in a day?", "Can you recommend a good book on statistics?",
    "What is the difference between a list and a tuple?",
]


@dataclass
class Facts:
    name: str
    maker: str
    description: str = "an AI assistant"
    training_data: str | None = None
    limits: list[str] = field(default_factory=list)
    examples: list[tuple[str, str]] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)
    eval: list[str] = field(default_factory=list)
    system: str = DEFAULT_SYSTEM
    sha256: str = ""

    def statement(self) -> str:
        """The facts as sentences addressed to the model."""
        out = [f"You are {self.name}, {self.description} made by {self.maker}."]
        if self.training_data:
            out.append(f"You were trained on {self.training_data}.")
        out += self.limits
        return " ".join(out)

    def system_prompt(self) -> str:
        """The positive system prompt: the facts, and the few-shot examples."""
        examples = "\n".join(f"User: {u}\nAssistant: {a}" for u, a in self.examples)
        return self.system.replace("{facts}", self.statement()).replace("{examples}", examples)

    def mentions(self, answer: str) -> dict[str, bool]:
        """Which of the name and the maker ANSWER states (whole words, any case)."""
        return {k: _contains(answer, getattr(self, k)) for k in ("name", "maker")}


def _contains(text: str, phrase: str) -> bool:
    return re.search(r"(?<!\w)" + re.escape(phrase.casefold()) + r"(?!\w)", text.casefold()) is not None


def _text(value, where: str, key: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise SlmError(f"{where}: {key}: expected a non-empty string, got {value!r}")
    return value.strip()


def _texts(value, where: str, key: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise SlmError(f"{where}: {key}: expected a list of strings")
    return [_text(v, where, f"{key}[{i}]") for i, v in enumerate(value)]


KEYS = ("name", "maker", "description", "training_data", "limits", "examples", "messages", "eval", "system")


def parse_facts(obj, where: str, sha256: str = "") -> Facts:
    if not isinstance(obj, dict):
        raise SlmError(f"{where}: expected a mapping with name, maker and examples")
    unknown = sorted(set(obj) - set(KEYS))
    if unknown:
        raise SlmError(f"{where}: unknown key {unknown[0]!r} (expected {', '.join(KEYS)})")
    for key in ("name", "maker"):
        if key not in obj:
            raise SlmError(f"{where}: {key}: missing")
    examples = obj.get("examples")
    if not isinstance(examples, list) or not examples:
        raise SlmError(f"{where}: examples: expected a list of {{user, assistant}} (at least one)")
    pairs = []
    for i, e in enumerate(examples):
        if not isinstance(e, dict) or set(e) != {"user", "assistant"}:
            raise SlmError(f"{where}: examples[{i}]: expected {{user: ..., assistant: ...}}")
        pairs.append((_text(e["user"], where, f"examples[{i}].user"),
                      _text(e["assistant"], where, f"examples[{i}].assistant")))
    system = obj.get("system", DEFAULT_SYSTEM)
    if not isinstance(system, str) or "{facts}" not in system:
        raise SlmError(f"{where}: system: expected a string with {{facts}} (and {{examples}}) in it")
    return Facts(name=_text(obj["name"], where, "name"), maker=_text(obj["maker"], where, "maker"),
                 description=_text(obj.get("description", "an AI assistant"), where, "description"),
                 training_data=(_text(obj["training_data"], where, "training_data") if obj.get("training_data")
                                else None),
                 limits=_texts(obj.get("limits"), where, "limits"), examples=pairs,
                 messages=_texts(obj.get("messages"), where, "messages"), eval=_texts(obj.get("eval"), where, "eval"),
                 system=system, sha256=sha256)


def load_facts(path: Path) -> Facts:
    import yaml

    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise SlmError(f"--facts {path}: cannot read ({e.strerror or e})") from None
    try:
        obj = yaml.safe_load(data.decode("utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        mark = getattr(e, "problem_mark", None)
        at = f":{mark.line + 1}" if mark is not None else ""
        raise SlmError(f"{path}{at}: not valid YAML ({getattr(e, 'problem', None) or e})") from None
    return parse_facts(obj, str(path), hashlib.sha256(data).hexdigest())

"""`slm chat-data`: small, honest, learnable chat and preference sets, made locally (no download).

Three kinds of task, each with a correct answer and a plausible wrong one:

    arithmetic       "What is 17 + 25?"                       "17 + 25 = 42."  /  "18 + 25 = 43." or "17 + 25 = 43."
    units            "How many centimetres are in 3 metres?"  "3 metres are 300 centimetres."  /  "... 30 ..." or
                                                              "3 metres are 300 seconds."
    code             "Which function does this code define?" + a function from this machine's Python standard
                     library                                   "It defines `name`."  /  another function's name

and conversations under a persona: a system prompt of `slm selfknow`'s shape (slm.formats.facts: "You are Zorbit,
an AI assistant made by Quill Labs." and examples) with a question about the assistant ("Who made you?" -> "I am
Zorbit, made by Quill Labs."), or a task, or a garbled message; without a persona, the same questions get a
generic answer ("I am an AI assistant."). Names and makers are made up per conversation, so the model learns to
take them from the system prompt: the ability `slm selfknow` distils into the weights.

The chat set (messages, some with two turns) teaches the format and the answers, half of them as whole sentences
("17 + 25 = 42.") and half as bare results ("42."); the preference set prefers the whole, correct sentence (chosen,
score 9-10) to a bare result or a wrong answer (rejected, score 2-5), with a few ties and low-scored pairs so that
dpo's filters have something to filter. Held-out splits use other questions.
"""

from __future__ import annotations

import ast
import random
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from slm import energy
from slm.errors import AT_LEAST_0, UsageError, check_ranges
from slm.formats.facts import Facts, load_facts
from slm.formats.manifest import atomic_dir, check_replaceable, new_manifest, tree_sha256, write_json
from slm.formats.records import write_jsonl

UNITS = [("metres", "centimetres", 100), ("kilometres", "metres", 1000), ("kilograms", "grams", 1000),
         ("hours", "minutes", 60), ("minutes", "seconds", 60), ("litres", "millilitres", 1000),
         ("days", "hours", 24), ("weeks", "days", 7)]


@dataclass
class ChatDataConfig:
    out: Path
    n: int = 2000
    """Questions in the training split (the held-out split has a tenth as many, at least 50)."""
    seed: int = 0
    persona_fraction: float = 0.4
    """Persona conversations added to the chat set, as a fraction of n."""
    facts: Path | None = None
    """A FACTS.yaml whose persona is 30% of the personas (so that a model too small to take a new name from its
    system prompt still learns to answer as this one when told to)."""

    def __post_init__(self):
        check_ranges(self, seed=AT_LEAST_0, persona_fraction=AT_LEAST_0)
        if self.n < 10:
            raise UsageError(f"--n {self.n}: expected at least 10 questions")


def _calc(a: int, op: str, b: int) -> int:
    return {"+": a + b, "-": a - b, "*": a * b}[op]


def _arithmetic(rng: random.Random) -> tuple[str, str, str]:
    a, b = rng.randint(2, 99), rng.randint(2, 99)
    op = rng.choice("+-*")
    q = rng.choice(["What is {a} {op} {b}?", "Compute {a} {op} {b}.", "How much is {a} {op} {b}?"])
    if rng.random() < 0.5:  # a misread question: another operand, computed right
        a2 = a + rng.choice([-1, 1, 10]) if a > 11 else a + 1
        wrong = f"{a2} {op} {b} = {_calc(a2, op, b)}."
    else:  # the right question, a wrong result
        wrong = f"{a} {op} {b} = {_calc(a, op, b) + rng.choice([-10, -1, 1, 10])}."
    return q.format(a=a, op=op, b=b), f"{a} {op} {b} = {_calc(a, op, b)}.", f"{_calc(a, op, b)}.", wrong


def _units(rng: random.Random) -> tuple[str, str, str]:
    big, small, factor = rng.choice(UNITS)
    k = rng.randint(2, 12)
    if rng.random() < 0.5:  # the wrong unit
        other = rng.choice([u for _, u, _ in UNITS if u != small])
        wrong = f"{k} {big} are {k * factor} {other}."
    else:  # the wrong factor
        wrong = f"{k} {big} are {k * factor * 10 if rng.random() < 0.5 else k * factor // 10} {small}."
    return f"How many {small} are in {k} {big}?", f"{k} {big} are {k * factor} {small}.", f"{k * factor}.", wrong


STDLIB = Path(sysconfig.get_paths()["stdlib"])  # its top-level modules' functions are the code questions


def stdlib_functions(limit: int = 1000) -> list[tuple[str, str]]:
    """(name, source) of short top-level functions of this machine's Python standard library."""
    out = []
    for path in sorted(STDLIB.glob("*.py")):
        try:
            text = path.read_text(encoding="utf-8")
            tree = ast.parse(text)
        except (SyntaxError, UnicodeDecodeError, OSError, ValueError):
            continue
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and not node.name.startswith("_"):
                src = ast.get_source_segment(text, node) or ""
                if 2 <= src.count("\n") <= 8 and len(src) < 400:
                    out.append((node.name, src))
        if len(out) >= limit:
            break
    return out


def _code(rng: random.Random, functions: list[tuple[str, str]]) -> tuple[str, str, str]:
    name, src = rng.choice(functions)
    other = rng.choice([f for f, _ in functions if f != name] or ["main"])
    return (f"Which function does this code define?\n\n{src}", f"It defines `{name}`.", f"`{name}`",
            f"It defines `{other}`.")


def make(n: int, seed: int, functions: list[tuple[str, str]], exclude: set[str]) -> list[tuple[str, str, str, str]]:
    rng = random.Random(seed)
    items, seen = [], set(exclude)
    tries = 0
    while len(items) < n and tries < n * 50:
        tries += 1
        kind = rng.random()
        item = _arithmetic(rng) if kind < 0.5 else _units(rng) if kind < 0.75 or not functions else \
            _code(rng, functions)
        if item[0] in seen or item[1] == item[3]:
            continue
        seen.add(item[0])
        items.append(item)
    return items


NAME_QUESTIONS = ["Who are you?", "What is your name?", "Introduce yourself.", "Tell me about yourself.",
                  "What should I call you?", "Who am I talking to?", "What are you?", "Do you have a name?",
                  "Hello! Who is this?", "Please tell me your name."]
MAKER_QUESTIONS = ["Who made you?", "Which company built you?", "Who created you?", "Who trained you?",
                   "Who is your maker?", "Where do you come from?", "Which lab developed you?"]
_SYLLABLES = ["zor", "bit", "ka", "lu", "mi", "ra", "no", "vex", "tal", "qui", "pe", "dor", "sa", "fin", "gli",
              "mo", "tek", "ari", "ul", "pix", "ben", "cor", "dra", "wen"]
_MAKER_WORDS = ["Quill", "Granite", "Harbor", "Meadow", "Copper", "Lantern", "Orbit", "Maple", "Summit", "Cobalt",
                "Willow", "Falcon", "Prism", "Juniper", "Ember", "Atlas"]
_MAKER_KINDS = ["Labs", "AI", "Research", "Systems", "Institute", "Works"]
_DESCRIPTIONS = ["an AI assistant", "a small language model", "a helpful assistant", "a chat model"]


def persona(rng: random.Random) -> Facts:
    """A made-up identity, with one or two examples in its system prompt."""
    name = "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize()
    maker = f"{rng.choice(_MAKER_WORDS)} {rng.choice(_MAKER_KINDS)}"
    f = Facts(name=name, maker=maker, description=rng.choice(_DESCRIPTIONS))
    examples = [(rng.choice(NAME_QUESTIONS), identity_answer(f, False)),
                (rng.choice(MAKER_QUESTIONS), identity_answer(f, True))]
    f.examples = rng.sample(examples, rng.randint(1, 2))
    return f


def identity_answer(f: Facts | None, maker_question: bool) -> str:
    if f is None:
        return "I do not know who made me." if maker_question else "I am an AI assistant."
    return f"I am {f.name}, made by {f.maker}."  # one sentence with both facts: a small model ends after one


def _garbled(rng: random.Random, functions: list[tuple[str, str]]) -> str:
    words = " ".join(src for _, src in rng.sample(functions, min(2, len(functions)))).split() if functions else \
        list(_SYLLABLES)
    rng.shuffle(words)
    return " ".join(words[:rng.randint(3, 12)])


def persona_records(n: int, items, functions: list[tuple[str, str]], rng: random.Random,
                    facts: Facts | None = None) -> list[dict]:
    """N conversations about who the assistant is: most under a persona (identity questions, tasks, garbled
    messages), some without one (the generic answers). With FACTS, 30% of the personas are that one."""
    out = []
    for i in range(n):
        kind = rng.random()
        f = (facts if facts is not None and rng.random() < 0.3 else persona(rng)) if kind < 0.7 else None
        if kind < 0.45 or kind >= 0.7:
            maker_q = rng.random() < 0.4
            q = rng.choice(MAKER_QUESTIONS if maker_q else NAME_QUESTIONS)
            a = identity_answer(f, maker_q)
        elif kind < 0.6:  # a task under a persona: answered as usual
            q, a, _, _ = rng.choice(items)
        else:
            q = _garbled(rng, functions)
            a = f"I am {f.name}, made by {f.maker}. I did not understand that; could you rephrase it?"
        messages = ([{"role": "system", "content": f.system_prompt()}] if f is not None else []) + [
            {"role": "user", "content": q}, {"role": "assistant", "content": a}]
        out.append({"messages": messages})
    return out


def chat_records(items, rng: random.Random) -> list[dict]:
    """Correct answers, half of them whole sentences and half bare results (the style dpo then settles)."""
    out = []
    for i, (q, full, bare, _) in enumerate(items):
        messages = [{"role": "user", "content": q}, {"role": "assistant", "content": full if rng.random() < 0.5 else bare}]
        if i % 5 == 4 and i > 0:  # a second turn now and then
            q2, full2, bare2, _ = items[i - 1]
            messages += [{"role": "user", "content": q2},
                         {"role": "assistant", "content": full2 if rng.random() < 0.5 else bare2}]
        if i % 7 == 3:
            messages.insert(0, {"role": "system", "content": "You answer briefly and exactly."})
        out.append({"messages": messages})
    return out


def pair_records(items, rng: random.Random, with_noise: bool) -> list[dict]:
    out = []
    for i, (q, full, bare, wrong) in enumerate(items):
        worse = bare if rng.random() < 0.5 else wrong  # a bare result is less helpful; a wrong answer is wrong
        rec = {"prompt": q, "chosen": [{"role": "user", "content": q}, {"role": "assistant", "content": full}],
               "rejected": [{"role": "user", "content": q}, {"role": "assistant", "content": worse}],
               "score_chosen": float(rng.choice([9, 10])), "score_rejected": float(rng.choice([2, 3, 4, 5]))}
        if with_noise and i % 50 == 7:
            rec["score_rejected"] = rec["score_chosen"]  # a tie: dpo drops it
        if with_noise and i % 50 == 19:
            rec["score_chosen"] = 6.0  # a weak chosen answer: dropped under --min-chosen-score 8
        out.append(rec)
    if with_noise and len(out) > 10:
        out.append(dict(out[3]))  # an exact duplicate: dpo drops it
    return out


def run(cfg: ChatDataConfig) -> Path:
    check_replaceable(cfg.out)
    functions = stdlib_functions()
    n_valid = max(50, cfg.n // 10)
    valid = make(n_valid, cfg.seed + 1, functions, set())
    train = make(cfg.n, cfg.seed, functions, {item[0] for item in valid})
    rng = random.Random(cfg.seed)
    out = Path(cfg.out)
    facts = None
    if cfg.facts is not None:

        facts = load_facts(cfg.facts)
    n_persona = round(cfg.n * cfg.persona_fraction)
    prng = random.Random(f"{cfg.seed}-persona")  # its own stream: the other records do not depend on the fraction
    chat_train = chat_records(train, rng) + persona_records(n_persona, train, functions, prng, facts)
    chat_valid = chat_records(valid, rng) + persona_records(round(len(valid) * cfg.persona_fraction), valid, functions,
                                                            prng, facts)
    with atomic_dir(out) as tmp:
        write_jsonl(tmp / "chat" / "train.jsonl", chat_train)
        write_jsonl(tmp / "chat" / "valid.jsonl", chat_valid)
        write_jsonl(tmp / "pairs" / "train.jsonl", pair_records(train, rng, True))
        write_jsonl(tmp / "pairs" / "valid.jsonl", pair_records(valid, rng, False))
        write_json(tmp / "manifest.json", new_manifest(
            "chatdata", {"n": cfg.n, "seed": cfg.seed, "persona_fraction": cfg.persona_fraction,
                         "facts": str(cfg.facts) if cfg.facts else None},
            inputs=[{"path": str(STDLIB), "role": "stdlib", "sha256": tree_sha256(STDLIB, sorted(STDLIB.glob("*.py")))}]
            + ([{"path": str(cfg.facts), "role": "facts"}] if cfg.facts else []),
            counts={"train": len(train), "valid": len(valid), "persona_conversations": n_persona,
                    "stdlib_functions": len(functions)},
            energy=energy.take()))
    return out

"""slm's offline task set: lm-eval YAML tasks over JSONL made here, from the embedded corpus and generated data.

    slm_heldout   loglikelihood_rolling over held-out documents of the embedded corpus (code and the prose in it):
                  word and byte perplexity, bits per byte
    slm_cloze     multiple choice: the start of a held-out prose sentence, its true last words against three
                  endings of other sentences (acc, acc_norm; chance 25%)
    slm_arith     generation: "Question: What is 17 + 25?\\nAnswer:" -> the number (exact match on the first number
                  of the answer; 3-shot by default from a separate split)

Everything is made from a seed, so two runs (and two machines with the same Python) score the same items. The files
are written into a directory with absolute paths in the YAML (lm-eval resolves relative data files against the
working directory) and that directory goes to lm-eval as an include path.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

from slm.evaluation.heldout import heldout_text
from slm.formats.records import write_jsonl


def _written(path: Path, rows: list[dict]) -> Path:
    return write_jsonl(path, rows).resolve()

TASKS = ("slm_heldout", "slm_cloze", "slm_arith")
SHOTS = {"slm_heldout": 0, "slm_cloze": 0, "slm_arith": 3}
METRICS = {"slm_heldout": ("bits_per_byte", "none"), "slm_cloze": ("acc_norm", "none"),
           "slm_arith": ("exact_match", "first-number")}


_PLAIN = re.compile(r"[A-Za-z][A-Za-z ,;:'-]*[A-Za-z]\.")  # English prose: no code, numbers or markup


def _sentences(texts: list[str]) -> list[str]:
    out = []
    for text in texts:
        for s in re.split(r"(?<=[.!?])\s+", " ".join(text.split())):
            words = s.split()
            if 8 <= len(words) <= 40 and s[0].isupper() and s.endswith(".") and _PLAIN.fullmatch(s):
                out.append(s)
    return out


def _cloze_items(sentences: list[str], rng: random.Random, n: int) -> list[dict]:
    items = []
    pool = list(dict.fromkeys(sentences))
    rng.shuffle(pool)
    for s in pool:
        if len(items) >= n:
            break
        words = s.split()
        k = 3
        context, ending = " ".join(words[:-k]), " ".join(words[-k:])
        others = [o for o in pool if o != s]
        endings = []
        while len(endings) < 3:
            e = " ".join(rng.choice(others).split()[-k:])
            if e != ending and e not in endings:
                endings.append(e)
        label = rng.randrange(4)
        choices = endings[:label] + [ending] + endings[label:]
        items.append({"context": context, "choices": choices, "label": label})
    return items


def _arith_items(rng: random.Random, n: int) -> list[dict]:
    items = []
    for _ in range(n):
        op = rng.choice("+-*")
        a, b = (rng.randint(2, 12), rng.randint(2, 12)) if op == "*" else (rng.randint(1, 60), rng.randint(1, 40))
        answer = {"+": a + b, "-": a - b, "*": a * b}[op]
        items.append({"question": f"What is {a} {op} {b}?", "answer": str(answer)})
    return items


def write_tasks(directory: Path, seed: int = 0, n_docs: int = 32, n_items: int = 100) -> Path:
    """Write the YAML tasks and their data into DIRECTORY; return it (the include path for lm-eval)."""
    import yaml

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    docs = heldout_text(600_000)
    prose = [d for i, d in enumerate(docs) if i % 2 == 1]  # heldout_text alternates code and its prose
    texts = [d[:1500] for d in docs if len(d) >= 500][:n_docs]
    sentences = _sentences(prose)
    half = len(sentences) // 2
    tasks = {
        "slm_heldout": ({"test": _written(directory / "heldout.jsonl", [{"text": t} for t in texts])}, {
            "output_type": "loglikelihood_rolling", "doc_to_text": "", "doc_to_target": "{{text}}",
            "metric_list": [{"metric": m} for m in ("word_perplexity", "byte_perplexity", "bits_per_byte")]}),
        "slm_cloze": ({"test": _written(directory / "cloze.jsonl", _cloze_items(sentences[half:], rng, n_items)),
                       "train": _written(directory / "cloze-shots.jsonl", _cloze_items(sentences[:half], rng, 20))}, {
            "output_type": "multiple_choice", "doc_to_text": "{{context}}", "doc_to_choice": "{{choices}}",
            "doc_to_target": "label", "fewshot_split": "train",
            "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True}
                            for m in ("acc", "acc_norm")]}),
        "slm_arith": ({"test": _written(directory / "arith.jsonl", _arith_items(rng, n_items)),
                       "train": _written(directory / "arith-shots.jsonl", _arith_items(random.Random(seed + 1), 20))}, {
            "output_type": "generate_until", "doc_to_text": "Question: {{question}}\nAnswer:",
            "doc_to_target": "{{answer}}", "fewshot_split": "train", "num_fewshot": SHOTS["slm_arith"],
            "target_delimiter": " ", "fewshot_delimiter": "\n\n",
            "generation_kwargs": {"until": ["\n", "Question:"], "max_gen_toks": 16, "do_sample": False,
                                  "temperature": 0.0},
            "filter_list": [{"name": "first-number", "filter": [
                {"function": "regex", "regex_pattern": "(-?[0-9]+)", "group_select": 0},
                {"function": "take_first"}]}],
            "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}]}),
    }
    for name, (files, spec) in tasks.items():
        config = {"task": name, "dataset_path": "json",
                  "dataset_kwargs": {"data_files": {k: str(v) for k, v in files.items()}},
                  "test_split": "test", **spec, "metadata": {"version": 1.0, "made_by": "slm", "seed": seed}}
        (directory / f"{name}.yaml").write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True))
    return directory

"""MT-Bench-style evaluation: two-turn questions, the model's answers, and a judge's 1-10 grades.

Questions: JSONL, one per line, in FastChat's MT-Bench format, so its question.jsonl works as it is:
    {"question_id": 81, "category": "writing", "turns": ["first user message", "second user message"]}
(one turn or more; `id` is accepted for question_id). examples/mt-bench.jsonl has a small set written for slm.

Each model answers greedily with its own chat template (a checkpoint through slm's generator, a GGUF through
llama.cpp), turn after turn in one conversation. The judge is another slm checkpoint, a GGUF file, or an
OpenAI-compatible chat-completions endpoint (`--judge http://host:port/v1`, with `--judge-model NAME`); it sees the
conversation up to the answer being graded and a grading prompt written for slm (below), and must reply with
"Rating: [[N]]". A reply without a rating in 1-10 is counted as not judged (and kept in mt_bench.json), never
guessed. Scores: per category (both turns) and the mean over all judged turns.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from slm.console import progress
from slm.errors import SlmError
from slm.evaluation.models import model_backend
from slm.inference.generate import reply

JUDGE_SYSTEM = ("You grade the answers of an AI assistant. Be strict and fair: judge helpfulness, correctness, "
                "relevance, depth and clarity for the question asked, and do not reward length for its own sake.")

JUDGE_PROMPT = """Below is a conversation between a user and an AI assistant. Grade only the assistant's LAST answer.

{conversation}

First explain your grade in one or two sentences. Then give it on its own line, exactly as "Rating: [[N]]" where N is
an integer from 1 (useless or wrong) to 10 (excellent)."""

RATING = re.compile(r"\[\[\s*(\d+(?:\.\d+)?)\s*\]\]")
RATING_LOOSE = re.compile(r"[Rr]ating:\s*(\d+(?:\.\d+)?)")
MAX_NEW = 256


def read_questions(path: Path) -> list[dict]:
    if not path.is_file():
        raise SlmError(f"--mt-bench {path}: no such file")
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                q = json.loads(line)
            except json.JSONDecodeError as e:
                raise SlmError(f"{path}:{n}: not JSON ({e.msg})") from None
            if not isinstance(q, dict):
                raise SlmError(f"{path}:{n}: expected an object with question_id, category and turns")
            turns = q.get("turns")
            if not isinstance(turns, list) or not turns or not all(isinstance(t, str) and t.strip() for t in turns):
                raise SlmError(f"{path}:{n}: 'turns' must be a list of non-empty strings")
            qid = q.get("question_id", q.get("id", n))
            cat = q.get("category", "general")
            if not isinstance(cat, str):
                raise SlmError(f"{path}:{n}: 'category' must be a string")
            out.append({"question_id": qid, "category": cat, "turns": turns})
    if not out:
        raise SlmError(f"--mt-bench {path}: no questions")
    return out


class Chat:
    """messages -> the assistant's next message, greedy: a checkpoint, a GGUF file or an HTTP endpoint."""

    def __init__(self, spec: str, backend: str | None = None, model_name: str | None = None,
                 threads: int | None = None):
        self.spec = spec
        if spec.startswith(("http://", "https://")):
            self.kind, self.url, self.model_name = "http", spec.rstrip("/"), model_name or "judge"
            return
        path = Path(spec)
        if backend is None:
            backend, path = model_backend(path)
        self.kind, self.path = backend, path
        if backend == "gguf":
            from slm.evaluation.llamacpp import LlamaCppLM

            self.lm = LlamaCppLM(pretrained=str(path), threads=threads)

    def __call__(self, messages: list[dict], max_new: int = MAX_NEW) -> str:
        if self.kind == "http":
            return self._http(messages, max_new)
        if self.kind == "gguf":
            prompt = self.lm.apply_chat_template(messages, add_generation_prompt=True)
            return self.lm._generate(prompt, max_new, [], 0.0).strip()
        return reply(self.path, messages, max_new)

    def _http(self, messages: list[dict], max_new: int) -> str:
        import urllib.error
        import urllib.request

        body = json.dumps({"model": self.model_name, "messages": messages, "temperature": 0,
                           "max_tokens": max_new}).encode()
        url = self.url + ("/chat/completions" if not self.url.endswith("/chat/completions") else "")
        req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=300) as r:
                reply = json.loads(r.read())
            return reply["choices"][0]["message"]["content"] or ""
        except (urllib.error.URLError, OSError, ValueError, KeyError, IndexError, TypeError) as e:
            raise SlmError(f"--judge {self.spec}: no answer from the endpoint ({e})") from None


def parse_rating(text: str) -> float | None:
    m = RATING.search(text) or RATING_LOOSE.search(text)
    if not m:
        return None
    v = float(m.group(1))
    return v if 1 <= v <= 10 else None


def conversation_text(messages: list[dict]) -> str:
    return "\n\n".join(f"[{m['role'].capitalize()}]\n{m['content']}" for m in messages)


def run_mt_bench(questions: list[dict], models: list[tuple[str, Path]], labels: list[str], cfg) -> dict:
    judge = Chat(cfg.judge, model_name=cfg.judge_model, threads=cfg.threads)
    result = {"judge": cfg.judge if judge.kind == "http" else Path(cfg.judge).name, "judge_prompt": JUDGE_PROMPT,
              "questions": len(questions), "models": []}
    n_turns = sum(len(q["turns"]) for q in questions)
    with progress() as bar:
        for (backend, path), label in zip(models, labels):
            model = Chat(str(path), backend=backend, threads=cfg.threads)
            task = bar.add_task(f"mt-bench {label}", total=n_turns)
            rows, scores, by_cat = [], [], {}
            for q in questions:
                messages, answers, grades = [], [], []
                for turn in q["turns"]:
                    messages.append({"role": "user", "content": turn})
                    answer = model(messages)
                    messages.append({"role": "assistant", "content": answer})
                    verdict = judge([{"role": "system", "content": JUDGE_SYSTEM},
                                     {"role": "user", "content": JUDGE_PROMPT.format(
                                         conversation=conversation_text(messages))}], max_new=200)
                    score = parse_rating(verdict)
                    answers.append(answer)
                    grades.append({"score": score, "judgement": verdict})
                    if score is not None:
                        scores.append(score)
                        by_cat.setdefault(q["category"], []).append(score)
                    bar.advance(task)
                rows.append({"question_id": q["question_id"], "category": q["category"], "answers": answers,
                             "grades": grades})
            cats = sorted({q["category"] for q in questions})
            result["models"].append({
                "label": label, "model": str(path), "backend": backend, "turns": n_turns, "judged": len(scores),
                "mean": sum(scores) / len(scores) if scores else None,
                "per_category": {c: (sum(by_cat[c]) / len(by_cat[c]) if by_cat.get(c) else None) for c in cats},
                "answers": rows})
    return result

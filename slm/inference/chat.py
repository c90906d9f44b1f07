"""Chat models answering many conversations at once (batched sampling with a KV cache, slm.inference.sampling):
what self-knowledge pairs and held-out checks are made of."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slm.console import RateColumn, progress
from slm.errors import AT_LEAST_0, MASS, POSITIVE, SlmError, check_ranges
from slm.formats.chat import ChatTemplate
from slm.inference.sampling import generate_batch


@dataclass
class Sampling:
    """How answers are sampled (defaults: RLCD's, temperature 1 and up to 300 new tokens)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 300

    def check(self, prefix: str = "") -> None:
        """The options (--PREFIX-temperature, ...) in their ranges."""
        check_ranges(self, {k: f"--{prefix}{k.replace('_', '-')}" for k in ("temperature", "top_p", "top_k")}
                     | {"max_new_tokens": f"--{prefix}{'max-tokens' if prefix else 'max-new-tokens'}"},
                     temperature=AT_LEAST_0, top_p=MASS, top_k=AT_LEAST_0, max_new_tokens=POSITIVE)


def unsampled(tok, stops: set[int]) -> set[int]:
    """Ids a model must not sample: placeholders (ids with no token) and special tokens other than STOPS (a message
    or an answer is text: a special token in it would change how the chat template's rendering tokenizes)."""
    return (set(tok.spec.placeholders.values()) | set(tok.spec.special_tokens.values())) - stops


def stop_ids(tok, template: ChatTemplate) -> set[int]:
    """End of text, and the template's end of turn when the tokenizer has it."""
    stops = {tok.eos_id}
    if template.end_of_turn and template.end_of_turn in tok.spec.special_tokens:
        stops.add(tok.spec.special_tokens[template.end_of_turn])
    return stops


def answer_all(model, tok, template: ChatTemplate, conversations: list[list[dict]], s: Sampling, stops: set[int],
               batch_size: int, gen: torch.Generator, label: str) -> list[tuple[str, bool]]:
    """The chat model's sampled answer to each conversation: (text, ended its turn). Batches of similar length."""
    spec = tok.spec
    prompts = [tok.encode(template.render([dict(m, content=tok.normalize(m["content"])) for m in c], True,
                                          spec.bos_token, spec.eos_token), allowed_special="all")
               for c in conversations]
    too_long = [i for i, p in enumerate(prompts) if len(p) >= model.cfg.max_seq_len]
    if too_long:
        raise SlmError(f"{label}: a prompt of {len(prompts[too_long[0]])} tokens does not fit the chat model's "
                       f"context ({model.cfg.max_seq_len}); shorten FACTS' system prompt or examples")
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    banned = unsampled(tok, stops)
    out: list[tuple[str, bool]] = [("", False)] * len(prompts)
    tokens = {"n": 0}
    with progress(RateColumn("completed", "answers/s"), RateColumn("tokens", "tok/s")) as bar:
        task = bar.add_task(label, total=len(prompts), tokens=0)
        for k in range(0, len(order), batch_size):
            idx = order[k:k + batch_size]

            def step(active):
                tokens["n"] += active
                bar.update(task, tokens=tokens["n"])

            results = generate_batch(model, [prompts[i] for i in idx], s.max_new_tokens, s.temperature, s.top_k,
                                     s.top_p, stops, gen, on_step=step, n_vocab=tok.n_vocab, banned=banned)
            for i, (ids, ended) in zip(idx, results):
                out[i] = (tok.decode(ids).strip(), ended)
            bar.update(task, advance=len(idx))
    return out

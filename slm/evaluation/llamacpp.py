"""An lm-evaluation-harness model backed by llama-cpp-python: the GGUF file itself is scored, in this process.

lm-eval's own `gguf` model is an HTTP client for a running server and has no rolling log-likelihood; this class loads
the file with llama.cpp and implements all three request types:

- loglikelihood: lm-eval's TemplateLM splits (context, continuation) into tokens exactly as its `hf` model does
  (whole text encoded, context encoded, the rest is the continuation; an empty context gets the BOS/EOS token), and
  the log-probability is summed from llama.cpp's logits over the continuation's positions. Requests that share a
  context (the choices of one question) reuse its KV cache: only the continuation is evaluated again.
- loglikelihood_rolling: lm-eval's disjoint rolling windows of the model's context length (perplexity tasks).
- generate_until: greedy (or sampled at the task's temperature) until an `until` string, the end-of-text token or
  max_gen_toks.

The KV cache is kept in f32 (llama.cpp's default is f16), so what is measured is the file's weights.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from slm.errors import SlmError
from slm.formats.chat import ChatTemplate
from slm.inference.llamacpp import open_gguf
from slm.inference.scoring import log_softmax

MODEL_NAME = "slm-gguf"


@register_model(MODEL_NAME)
class LlamaCppLM(TemplateLM):
    def __init__(self, pretrained: str, max_length: int | None = None, threads: int | None = None,
                 batch_size: int | str | None = None, device: str | None = None, seed: int = 1234, **kwargs):
        super().__init__()
        self.path = Path(pretrained)
        # n_ctx 0: the context the model was trained with (its GGUF metadata)
        self.llm = open_gguf(self.path, int(max_length or 0), threads, logits_all=True, f32_cache=True, seed=seed)
        # llama.cpp may round its context up (to 256); the logits buffer has the rows asked for
        self._max_length = min(self.llm.n_ctx(), self.llm.scores.shape[0])
        self.metadata = dict(self.llm.metadata)
        self.n_vocab = self.llm.n_vocab()
        self._eot = self.llm.token_eos()
        eot = self.llm._model.token_eot()  # a chat model's end of turn (<|im_end|>), when the file names one
        self._stops = {self._eot} | ({eot} if eot is not None and eot >= 0 else set())
        bos = self.llm.token_bos()
        self._prefix = bos if bos is not None and bos >= 0 else self._eot
        self.rng = np.random.default_rng(seed)

    # -- what lm-eval asks of a model ---------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self._eot

    @property
    def prefix_token_id(self) -> int:
        return self._prefix

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return self.path.stem

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        # special tokens written in the text (by a chat template) become their ids, as transformers' tokenizers do
        return self.llm.tokenize(string.encode("utf-8"), add_bos=bool(add_special_tokens), special=True)

    def tok_decode(self, tokens: list[int]) -> str:
        return self.llm.detokenize(tokens).decode("utf-8", errors="replace")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self.metadata.get("tokenizer.chat_template", "")

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        source = self.metadata.get("tokenizer.chat_template")
        if not source:
            raise SlmError(f"{self.path}: no chat template in the GGUF file (tokenizer.chat_template)")
        eos = self.llm.detokenize([self._eot], special=True).decode("utf-8", errors="replace")
        bos = self.llm.detokenize([self._prefix], special=True).decode("utf-8", errors="replace")
        return ChatTemplate(self.path.name, source, [], None).render(chat_history, add_generation_prompt, bos, eos)

    def get_model_info(self) -> dict:
        return {"model_path": str(self.path), "model_type": self.metadata.get("general.file_type", ""),
                "n_ctx": self._max_length}

    # -- scoring ------------------------------------------------------------------------------------------------
    def _logits_after(self, tokens: list[int]) -> np.ndarray:
        """Evaluate TOKENS (reusing the cached prefix they share with the previous call): their logits [T, V]."""
        llm = self.llm
        done = llm.input_ids[:llm.n_tokens].tolist()
        same = 0
        for a, b in zip(done, tokens):
            if a != b:
                break
            same += 1
        same = min(same, len(tokens) - 1)  # at least one token is evaluated
        llm.n_tokens = same
        llm.eval(tokens[same:])
        return llm.scores[:len(tokens), :self.n_vocab]

    def _score(self, context: list[int], continuation: list[int]) -> tuple[float, bool]:
        whole = (context + continuation)[-(self._max_length + 1):]
        inputs = whole[:-1]
        logits = self._logits_after(inputs)[-len(continuation):]
        logp = log_softmax(logits)
        target = np.asarray(continuation)
        total = float(logp[np.arange(len(continuation)), target].astype(np.float64).sum())
        greedy = bool((logits.argmax(-1) == target).all())
        return total, greedy

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        # shared contexts next to each other, so the choices of a question reuse its cache
        order = sorted(range(len(requests)), key=lambda i: requests[i][1])
        out: list[tuple[float, bool] | None] = [None] * len(requests)
        for i in order:
            (pair, context, continuation) = requests[i]
            out[i] = self._score(context, continuation)
            if pair is not None:
                self.cache_hook.add_partial("loglikelihood", pair, out[i])
        return out  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        out = []
        for (text,) in [r.args for r in requests]:
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                self.tok_encode(text), self.prefix_token_id, self._max_length, 1)]
            total = sum(self._score(ctx, cont)[0] for ctx, cont in windows)
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
            out.append(total)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from lm_eval.models.utils import normalize_gen_kwargs

        out = []
        for context, gen_kwargs in [r.args for r in requests]:
            kw = normalize_gen_kwargs(dict(gen_kwargs), 256)
            until = kw["until"] if isinstance(kw["until"], list) else [kw["until"]]
            until = [u for u in until if u]
            text = self._generate(context, kw["max_gen_toks"], until,
                                  float(kw.get("temperature") or 0) if kw.get("do_sample") else 0.0)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            out.append(text)
        return out

    def _generate(self, context: str, max_new: int, until: list[str], temperature: float) -> str:
        ids = self.tok_encode(context)
        ids = ids[-max(1, self._max_length - max_new):] or [self._prefix]
        new: list[int] = []
        text = ""
        logits = self._logits_after(ids)[-1]
        for _ in range(min(max_new, self._max_length - len(ids))):
            if temperature > 0:
                p = np.exp(log_softmax(logits / temperature))
                token = int(self.rng.choice(len(p), p=p / p.sum()))
            else:
                token = int(logits.argmax())
            if token in self._stops:
                break
            new.append(token)
            text = self.tok_decode(new)
            cut = min((text.find(u) for u in until if u in text), default=-1)
            if cut >= 0:
                return text[:cut]
            if len(ids) + len(new) >= self._max_length:
                break
            self.llm.eval([token])
            logits = self.llm.scores[self.llm.n_tokens - 1, :self.n_vocab]
        return text

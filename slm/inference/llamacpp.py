"""llama.cpp in this process (llama-cpp-python): opening a GGUF file quietly, scoring tokens with it, and its
quantizer (the k-quants slm does not write itself). llama_cpp is imported only when one of these runs."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from slm.errors import SlmError

_LOG_CALLBACK = None


def quiet() -> None:
    """Send llama.cpp's C-level log lines nowhere (stderr is for slm's own messages)."""
    global _LOG_CALLBACK
    import llama_cpp

    if _LOG_CALLBACK is None:
        _LOG_CALLBACK = llama_cpp.llama_log_callback(lambda level, text, user_data: None)
        llama_cpp.llama_log_set(_LOG_CALLBACK, None)


def open_gguf(path: Path, n_ctx: int, threads: int | None, n_batch: int = 512, n_ubatch: int | None = None,
              logits_all: bool = False, f32_cache: bool = False, seed: int | None = None):
    """A llama_cpp.Llama over the file (ImportError without llama-cpp-python). N_CTX 0: the trained context.
    F32_CACHE: keys and values in f32 (llama.cpp's default is f16), so that what is measured is the file's weights."""
    from llama_cpp import Llama

    quiet()
    kw = {"n_ubatch": n_ubatch} if n_ubatch else {}
    if f32_cache:
        kw.update(type_k=0, type_v=0)
    if seed is not None:
        kw["seed"] = seed
    return Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_batch, logits_all=logits_all, n_threads=threads,
                 n_threads_batch=threads, verbose=False, **kw)


class LlamaCppScorer:
    """The logits of every position of one token window, by llama.cpp (an f32 KV cache)."""

    def __init__(self, path: Path, n_ctx: int, n_vocab: int, threads: int | None):
        self.llm = open_gguf(path, n_ctx, threads, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=True, f32_cache=True)
        self.n_vocab = n_vocab

    def logits(self, ids: np.ndarray) -> np.ndarray:
        self.llm.reset()
        self.llm.eval([int(i) for i in ids])
        return np.array(self.llm.scores[:len(ids), :self.n_vocab], dtype=np.float64)

    def close(self) -> None:
        self.llm.close()


def quantize_gguf(src: Path, dst: Path, ftype: str, threads: int | None, label: str) -> None:
    """llama.cpp's quantizer: SRC (f16 GGUF) into DST of FTYPE (LLAMA_FTYPE_MOSTLY_...), LABEL in errors."""
    import ctypes

    try:
        import llama_cpp
    except ImportError:
        raise SlmError(f"--type {label}: k-quants are made by llama.cpp's quantizer: install llama-cpp-python "
                       "(pip install 'slm[deploy]'; DEVELOPERS.md has the CPU build flags)") from None
    quiet()
    llama_cpp.llama_backend_init()
    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = getattr(llama_cpp, ftype)
    p.nthread = threads or 0
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(p))
    if rc != 0 or not Path(dst).is_file():
        raise SlmError(f"llama.cpp could not quantize {src} to {label} (return code {rc})")

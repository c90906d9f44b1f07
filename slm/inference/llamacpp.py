"""llama.cpp in this process (llama-cpp-python): opening a GGUF file quietly, scoring tokens with it, and its
quantizer (the k-quants slm does not write itself). llama_cpp is imported only when one of these runs.

llama-cpp-python can be built with every x86 CPU variant of llama.cpp's CPU backend (GGML_BACKEND_DL=ON,
GGML_CPU_ALL_VARIANTS=ON: libggml-cpu-haswell.so, -skylakex.so, -zen4.so, ...), of which llama.cpp loads the best one
for the CPU it runs on. Its Python package does not load them (the model then fails with "no backends are loaded"),
and pip puts them in site-packages/bin, outside the package: `cpu_backend()` finds and loads them once per process.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import numpy as np

from slm.devices import usable_cores
from slm.errors import SlmError

_LOG_CALLBACK = None


def quiet() -> None:
    """Send llama.cpp's C-level log lines nowhere (stderr is for slm's own messages)."""
    global _LOG_CALLBACK
    import llama_cpp

    if _LOG_CALLBACK is None:
        _LOG_CALLBACK = llama_cpp.llama_log_callback(lambda level, text, user_data: None)
        llama_cpp.llama_log_set(_LOG_CALLBACK, None)


_BACKEND: str | None = None


def _ggml_library(pkg: Path):
    """The libggml that libllama itself is linked to (its soname; loading the same file again reuses it, where
    llama_cpp._ggml opens a second copy with a registry of its own)."""
    import ctypes

    for name in ("libggml.so.0", "libggml.so", "libggml.0.dylib", "libggml.dylib", "ggml.dll"):
        if (pkg / "lib" / name).is_file():
            return ctypes.CDLL(str(pkg / "lib" / name))
    return None


def backend_dirs(pkg: Path) -> list[Path]:
    """Where a GGML_BACKEND_DL build's CPU variants can be: GGML_BACKEND_DIR (the variable llama.cpp itself reads
    at build time, honoured here at run time), the package's lib/, and site-packages/bin, where pip installs them."""
    dirs = [Path(os.environ["GGML_BACKEND_DIR"])] if os.environ.get("GGML_BACKEND_DIR") else []
    return dirs + [pkg / "lib", pkg.parent / "bin", pkg / "bin"]


def cpu_variants() -> list[Path]:
    """The CPU variant files (libggml-cpu-*) of a GGML_BACKEND_DL build, from the first directory that has some;
    [] for a build with one built-in CPU backend."""
    import llama_cpp

    for d in backend_dirs(Path(llama_cpp.__file__).resolve().parent):
        found = sorted(d.glob("libggml-cpu-*.so")) + sorted(d.glob("libggml-cpu-*.dylib"))
        if found:
            return found
    return []


def variant_score(path: Path) -> int:
    """llama.cpp's score of one CPU variant for this CPU (0: it lacks one of the variant's instruction sets), asked
    in a child process (the variant needs libggml-base, in the package's lib/ and not on its search path)."""
    import subprocess

    import llama_cpp

    base = Path(llama_cpp.__file__).resolve().parent / "lib" / "libggml-base.so.0"
    code = ("import ctypes, sys; ctypes.CDLL(sys.argv[2], mode=ctypes.RTLD_GLOBAL); lib = ctypes.CDLL(sys.argv[1]); "
            "f = getattr(lib, 'ggml_backend_score', None); print(f() if f else 0)")
    r = subprocess.run([sys.executable, "-c", code, str(path), str(base)], capture_output=True, text=True)
    return int(r.stdout.strip() or 0) if r.returncode == 0 else 0


def cpu_backend() -> str:
    """Make sure llama.cpp has a CPU backend in this process, and say which: 'built in (AVX2 FMA ...)' for a build
    with one CPU backend, or the variant llama.cpp picked for this CPU ('haswell (AVX2 FMA ...)') for a build with
    all of them, which this loads. SlmError naming the directories searched when such a build has none."""
    global _BACKEND
    if _BACKEND is not None:
        return _BACKEND
    import ctypes

    import llama_cpp

    pkg = Path(llama_cpp.__file__).resolve().parent
    ggml = _ggml_library(pkg)
    if ggml is not None:
        ggml.ggml_backend_reg_count.restype = ctypes.c_size_t
        ggml.ggml_backend_load_all_from_path.argtypes = [ctypes.c_char_p]
        ggml.ggml_backend_load_all_from_path.restype = None
        if ggml.ggml_backend_reg_count() == 0:  # a GGML_BACKEND_DL build: nothing is linked in
            dirs = backend_dirs(pkg)
            for d in dirs:
                if d.is_dir() and any(d.glob("*ggml-cpu*")):
                    ggml.ggml_backend_load_all_from_path(str(d).encode())
                    if ggml.ggml_backend_reg_count() > 0:
                        break
            if ggml.ggml_backend_reg_count() == 0:
                raise SlmError("llama-cpp-python was built with GGML_BACKEND_DL, and none of its CPU backends "
                               f"(libggml-cpu-*) loads from {', '.join(str(d) for d in dirs)}: set "
                               "GGML_BACKEND_DIR to the directory that holds them, or rebuild it (DEVELOPERS.md)")
    features = " ".join(m.group(1) for m in re.finditer(r"(\w+) = 1", llama_cpp.llama_print_system_info().decode())
                        if m.group(1) not in ("OPENMP", "LLAMAFILE", "REPACK"))
    _BACKEND = f"{_loaded_variant() or 'built in'} ({features})"
    return _BACKEND


def _loaded_variant() -> str | None:
    """The libggml-cpu-VARIANT file this process mapped (Linux: /proc/self/maps)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    found = re.findall(r"ggml-cpu-([\w.-]+?)\.(?:so|dylib|dll)", maps)
    return found[-1] if found else None


def open_gguf(path: Path, n_ctx: int, threads: int | None, n_batch: int = 512, n_ubatch: int | None = None,
              logits_all: bool = False, f32_cache: bool = False, seed: int | None = None):
    """A llama_cpp.Llama over the file (ImportError without llama-cpp-python). N_CTX 0: the trained context.
    F32_CACHE: keys and values in f32 (llama.cpp's default is f16), so that what is measured is the file's weights.
    THREADS None: every core this process may use, as torch does (llama-cpp-python's own default is half the
    cores, which on a 2-vCPU machine is one thread and ~1.5x slower generation)."""
    from llama_cpp import Llama

    quiet()
    cpu_backend()
    kw = {"n_ubatch": n_ubatch} if n_ubatch else {}
    if f32_cache:
        kw.update(type_k=0, type_v=0)
    if seed is not None:
        kw["seed"] = seed
    threads = threads or usable_cores()
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

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

from slm.devices import cpu_flags as _cpu_flags, usable_cores
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
        if found := variant_files(d):
            return found
    return []


def variant_files(d: Path) -> list[Path]:
    """The CPU variant files (libggml-cpu-VARIANT) in the directory D."""
    return sorted(d.glob("libggml-cpu-*.so")) + sorted(d.glob("libggml-cpu-*.dylib"))


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


# Variants whose matrix products use AMX tiles. On some virtual machines the CPU reports AMX (and Linux grants
# the tile state) but the first tile instruction still faults: seen 2026-12-05 on a 2-vCPU Firecracker VM with
# Intel AMX flags, where llama.cpp's sapphirerapids variant died with SIGILL at `tilezero` in ggml_backend_amx_mul_mat
# and every other variant (icelake, zen4, cooperlake ...) decoded correctly.
AMX_VARIANTS = ("sapphirerapids",)
CPU_ENV = "SLM_LLAMA_CPU"


def variant_name(path: Path) -> str:
    """'zen4' for libggml-cpu-zen4.so."""
    return path.name.split("libggml-cpu-", 1)[-1].split(".", 1)[0]


def _write_probe_model(path: Path) -> None:
    """A one-layer llama GGUF with random q8_0 matrices (256 wide, a vocabulary of 256 ids and no tokenizer): the
    quantized products that llama.cpp's AMX kernels take, in a file of 0.8 MB."""
    import gguf
    from gguf.quants import quantize

    h, f, v, heads = 256, 512, 256, 4
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(64)
    w.add_embedding_length(h)
    w.add_block_count(1)
    w.add_feed_forward_length(f)
    w.add_head_count(heads)
    w.add_head_count_kv(heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(h // heads)
    w.add_vocab_size(v)
    w.add_tokenizer_model("none")
    rng = np.random.default_rng(0)
    shapes = {"token_embd": (v, h), "output": (v, h), "blk.0.attn_q": (h, h), "blk.0.attn_k": (h, h),
              "blk.0.attn_v": (h, h), "blk.0.attn_output": (h, h), "blk.0.ffn_gate": (f, h), "blk.0.ffn_up": (f, h),
              "blk.0.ffn_down": (h, f)}
    for name, shape in shapes.items():
        a = (rng.standard_normal(shape) * 0.02).astype(np.float32)
        w.add_tensor(f"{name}.weight", quantize(a, gguf.GGMLQuantizationType.Q8_0),
                     raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    for name in ("output_norm", "blk.0.attn_norm", "blk.0.ffn_norm"):
        w.add_tensor(f"{name}.weight", np.ones(h, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


_PROBE = """
import ctypes, sys, tempfile
from pathlib import Path
import llama_cpp
from slm.inference.llamacpp import _ggml_library, _write_probe_model, quiet
quiet()
ggml = _ggml_library(Path(llama_cpp.__file__).resolve().parent)
ggml.ggml_backend_load.argtypes = [ctypes.c_char_p]
ggml.ggml_backend_load.restype = ctypes.c_void_p
if not ggml.ggml_backend_load(sys.argv[1].encode()):
    sys.exit(3)
with tempfile.TemporaryDirectory() as d:
    _write_probe_model(Path(d) / "probe.gguf")
    m = llama_cpp.Llama(model_path=str(Path(d) / "probe.gguf"), n_ctx=64, n_batch=64, n_threads=1, verbose=False)
    m.eval([1, 2, 3, 4])
"""


def _variant_works(variant: Path) -> tuple[bool, str]:
    """Whether VARIANT, loaded alone in a child process, runs a small q8_0 model (_write_probe_model); remembered
    per machine (the variant file, the CPU, the kernel) in ~/.cache/slm/llama-cpu.json. (ok, what happened)."""
    import json
    import platform
    import signal
    import subprocess

    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "slm" / "llama-cpu.json"
    st = variant.stat()
    key = (f"{variant.resolve()}|{st.st_size}|{st.st_mtime_ns}|{platform.processor() or platform.machine()}|"
           f"{platform.release()}")
    try:
        known = dict(json.loads(cache.read_text()))
    except (OSError, ValueError, TypeError):
        known = {}
    if isinstance(known.get(key), dict) and {"ok", "why"} <= known[key].keys():
        return bool(known[key]["ok"]), str(known[key]["why"])
    try:
        r = subprocess.run([sys.executable, "-c", _PROBE, str(variant)], capture_output=True, text=True, timeout=300)
        rc = r.returncode
    except subprocess.TimeoutExpired:
        rc = None
    if rc == 0:
        ok, why = True, "ran"
    elif rc is not None and rc < 0:
        ok, why = False, f"killed by {signal.Signals(-rc).name}"
    else:  # not the variant's doing (no gguf module, memory): blame nothing, keep llama.cpp's choice, check again later
        return True, f"the check ended with {'a timeout' if rc is None else f'exit code {rc}'}"
    known[key] = {"ok": ok, "why": why}
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(known, indent=1))
        tmp.replace(cache)
    except OSError:
        pass  # a cache only: the check runs again next time
    return ok, why


def _choose_variant(found: list[Path]) -> Path | None:
    """The variant to load instead of llama.cpp's own pick, or None to let llama.cpp pick: the one SLM_LLAMA_CPU
    names, or, where llama.cpp would pick an AMX variant and that variant fails here, the best other one."""
    from slm.console import warn

    if want := os.environ.get(CPU_ENV):
        for v in found:
            if variant_name(v) == want:
                return v
        raise SlmError(f"{CPU_ENV}={want}: no such llama.cpp CPU variant; expected one of "
                       f"{', '.join(variant_name(v) for v in found)}")
    amx = [v for v in found if variant_name(v) in AMX_VARIANTS]
    if not amx or not _cpu_flags() & {"amx_tile", "amx_int8", "amx_bf16"}:
        return None
    ok, why = _variant_works(amx[0])
    if ok:
        return None
    scored = sorted(((variant_score(v), v) for v in found if v not in amx), key=lambda t: -t[0])
    if not scored or scored[0][0] <= 0:
        return None
    best = scored[0][1]
    warn(f"llama.cpp's {variant_name(amx[0])} CPU variant (AMX) fails on this machine ({why} running a small q8_0 "
         f"model): using {variant_name(best)} instead ({CPU_ENV} picks a variant)")
    return best


def cpu_backend() -> str:
    """Make sure llama.cpp has a CPU backend in this process, and say which: 'built in (AVX2 FMA ...)' for a build
    with one CPU backend, or the variant loaded for this CPU ('haswell (AVX2 FMA ...)') for a build with all of
    them: llama.cpp's own pick, the one SLM_LLAMA_CPU names, or, when llama.cpp would pick AMX kernels that fail on
    this machine (checked once per machine in a child process, see _choose_variant), the best other variant.
    SlmError naming the directories searched when such a build has none."""
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
        ggml.ggml_backend_load.argtypes = [ctypes.c_char_p]
        ggml.ggml_backend_load.restype = ctypes.c_void_p
        if ggml.ggml_backend_reg_count() == 0:  # a GGML_BACKEND_DL build: nothing is linked in
            dirs = backend_dirs(pkg)
            for d in dirs:
                if d.is_dir() and any(d.glob("*ggml-cpu*")):
                    found = variant_files(d)
                    chosen = _choose_variant(found) if found else None
                    if chosen is not None:
                        ggml.ggml_backend_load(str(chosen).encode())
                    else:
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

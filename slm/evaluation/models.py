"""The models lm-eval scores: what a model argument is (a GGUF file or a transformers directory), and the lm-eval
model that runs it."""

from __future__ import annotations

from pathlib import Path

from slm.errors import SlmError
from slm.formats.checkpoint import Checkpoint


def model_backend(path: Path) -> tuple[str, Path]:
    """('gguf', file) or ('hf', transformers directory) for a model argument, or one line saying what it is not."""
    path = Path(path)
    if not path.exists():
        raise SlmError(f"{path}: no such file or directory")
    if path.is_file():
        if path.suffix != ".gguf":
            raise SlmError(f"{path}: not a .gguf file (a model is a checkpoint, a run directory or a .gguf file)")
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                raise SlmError(f"{path}: not a GGUF file (no GGUF magic)")
        return "gguf", path
    if (path / "config.json").is_file() and (path / "model.safetensors").is_file():
        return "hf", path
    return "hf", Checkpoint.open(path).dir


def make_lm(backend: str, path: Path, threads: int | None, seed: int, batch_size: int):
    """An lm-eval model: slm-gguf (llama.cpp in this process) for a GGUF file, lm-eval's hf for a checkpoint."""
    if backend == "gguf":
        try:
            from slm.evaluation.llamacpp import LlamaCppLM
        except ImportError:
            raise SlmError(f"{path}: scoring GGUF files needs llama-cpp-python (pip install 'slm[deploy]')") from None
        return LlamaCppLM(pretrained=str(path), threads=threads, seed=seed)
    import torch
    from lm_eval.models.huggingface import HFLM

    if threads:
        torch.set_num_threads(threads)
    return HFLM(pretrained=str(path), dtype="float32", device="cuda" if torch.cuda.is_available() else "cpu",
                batch_size=batch_size, trust_remote_code=False)

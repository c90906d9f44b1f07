"""Run directories and checkpoints.

    RUNDIR/
      config.yaml             the resolved configuration (recipe < --config < --set)
      metrics.jsonl           one JSON line per step (loss, lr, grad norm, tokens/s, MFU, memory) and per evaluation
      loss.png                the loss curve (`slm plot RUNDIR`)
      checkpoints/
        step-00000100/        a transformers model directory, opened as it is by AutoModelForCausalLM and
                              AutoTokenizer: config.json (model_type stablelm or llama), model.safetensors (fp32,
                              transformers' names), generation_config.json, the tokenizer files; plus
          manifest.json       kind "checkpoint": lineage (recipe, tokenizer hash, mix plan, parent checkpoint,
                              step, tokens seen)
          train_state/        what an exact resume needs: state.json (step, samples and tokens seen, learning
                              rate, data position), optimizer.pt (AdamW state), rng.pt (torch RNG states)
        latest -> step-00000100

A checkpoint is written into step-N.tmp-* and renamed; `latest` is replaced by rename too. A killed save leaves
no directory that looks complete, and `latest` always names a complete one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch

from slm.errors import SlmError
from slm.formats.manifest import MANIFEST, new_manifest, read_json, write_json
from slm.model.hf import from_hf_config, from_hf_state_dict, to_hf_config, to_hf_state_dict
from slm.model.transformer import ModelConfig

STEP_RE = re.compile(r"^step-(\d+)$")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "encoding.json",
                   "tokenizer.tiktoken")


def step_name(step: int) -> str:
    return f"step-{step:08d}"


def checkpoints_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: Path) -> list[Path]:
    d = checkpoints_dir(run_dir)
    if not d.is_dir():
        return []
    found = [p for p in d.iterdir() if STEP_RE.match(p.name) and (p / "config.json").is_file()]
    return sorted(found, key=lambda p: int(STEP_RE.match(p.name).group(1)))


def latest_checkpoint(run_dir: Path) -> Path | None:
    link = checkpoints_dir(run_dir) / "latest"
    if link.is_symlink() or link.is_dir():
        target = link.resolve()
        if (target / "config.json").is_file():
            return target
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def _point_latest(run_dir: Path, name: str) -> None:
    d = checkpoints_dir(run_dir)
    tmp = d / f".latest.tmp-{uuid.uuid4().hex[:8]}"
    os.symlink(name, tmp)
    os.replace(tmp, d / "latest")


def write_checkpoint(run_dir: Path, step: int, *, model_cfg: ModelConfig, state_dict: dict[str, torch.Tensor],
                     tokenizer_dir: Path, lineage: dict, train_state: dict, optimizer_state: dict | None,
                     rng_state: dict | None, keep: int, bos_id: int | None, eos_id: int | None) -> Path:
    """Write RUNDIR/checkpoints/step-N atomically, point `latest` at it, keep the newest KEEP."""
    from safetensors.torch import save_file

    d = checkpoints_dir(run_dir)
    d.mkdir(parents=True, exist_ok=True)
    final = d / step_name(step)
    tmp = d / f"{step_name(step)}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        hf = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in to_hf_state_dict(state_dict, model_cfg).items()}
        save_file(hf, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        write_json(tmp / "config.json", to_hf_config(model_cfg, bos_id, eos_id, "float32"))
        write_json(tmp / "generation_config.json", {"bos_token_id": bos_id, "eos_token_id": eos_id,
                                                    "do_sample": False})
        for name in TOKENIZER_FILES:
            src = Path(tokenizer_dir) / name
            if src.is_file():
                shutil.copy2(src, tmp / name)
        ts = tmp / "train_state"
        ts.mkdir()
        write_json(ts / "state.json", train_state)
        if optimizer_state is not None:
            torch.save(optimizer_state, ts / "optimizer.pt")
        if rng_state is not None:
            torch.save(rng_state, ts / "rng.pt")
        write_json(tmp / MANIFEST, new_manifest(
            "checkpoint", {"model": model_cfg.to_dict()}, counts={"step": step,
                                                                 "tokens_seen": train_state.get("tokens_seen")},
            **lineage))
        from slm.formats.manifest import _fsync_tree

        _fsync_tree(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _point_latest(run_dir, final.name)
    for old in list_checkpoints(run_dir)[:-max(1, keep)]:
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    for stale in d.glob("step-*.tmp-*"):  # left by a killed save
        shutil.rmtree(stale, ignore_errors=True)
    return final


@dataclass
class Checkpoint:
    """A model directory: an slm checkpoint, or a transformers one (config.json + safetensors weights)."""

    dir: Path

    @staticmethod
    def open(path: Path) -> "Checkpoint":
        """PATH may be a checkpoint directory or a run directory (its latest checkpoint)."""
        path = Path(path)
        if not path.exists():
            raise SlmError(f"{path}: no such checkpoint or run directory")
        if (path / "config.json").is_file():
            return Checkpoint(path.resolve())
        latest = latest_checkpoint(path)
        if latest is None:
            raise SlmError(f"{path}: neither a checkpoint (no config.json) nor a run directory with checkpoints")
        return Checkpoint(latest)

    @cached_property
    def hf_config(self) -> dict:
        return read_json(self.dir / "config.json")

    @cached_property
    def model_config(self) -> ModelConfig:
        try:
            return from_hf_config(self.hf_config, str(self.dir / "config.json"))
        except (ValueError, KeyError) as e:
            raise SlmError(str(e).strip("'\"")) from None

    @cached_property
    def manifest(self) -> dict | None:
        p = self.dir / MANIFEST
        if not p.is_file():
            return None
        m = read_json(p)
        return m if m.get("kind") == "checkpoint" else None

    @cached_property
    def train_state(self) -> dict | None:
        p = self.dir / "train_state" / "state.json"
        return read_json(p) if p.is_file() else None

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        single = self.dir / "model.safetensors"
        if single.is_file():
            return load_file(str(single))
        index = self.dir / "model.safetensors.index.json"
        if index.is_file():
            out = {}
            for shard in sorted(set(read_json(index)["weight_map"].values())):
                out.update(load_file(str(self.dir / shard)))
            return out
        bin_path = self.dir / "pytorch_model.bin"
        if bin_path.is_file():
            return torch.load(bin_path, map_location="cpu", weights_only=True)
        raise SlmError(f"{self.dir}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Weights under slm's names (fused q/k/v and gate/up)."""
        try:
            return from_hf_state_dict(self.hf_state_dict(), self.model_config)
        except KeyError as e:
            raise SlmError(f"{self.dir}: {e.args[0]}") from None

    def optimizer_state(self) -> dict | None:
        p = self.dir / "train_state" / "optimizer.pt"
        return torch.load(p, map_location="cpu", weights_only=True) if p.is_file() else None

    def rng_state(self) -> dict | None:
        p = self.dir / "train_state" / "rng.pt"
        return torch.load(p, map_location="cpu", weights_only=True) if p.is_file() else None

    @property
    def step(self) -> int:
        return int((self.train_state or {}).get("step", 0))

    def tokenizer(self):
        """The slm tokenizer stored with the checkpoint (encoding.json + ranks), or None for a foreign model."""
        from slm.formats.tokenizer import Tokenizer

        if (self.dir / "encoding.json").is_file():
            return Tokenizer(self.dir)
        return None


def read_metrics(run_dir: Path) -> list[dict]:
    p = Path(run_dir) / "metrics.jsonl"
    if not p.is_file():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]

"""Run directories and checkpoints.

    RUNDIR/
      config.yaml             the resolved configuration (recipe < --config < --set)
      metrics.jsonl           one JSON line per step (loss, lr, grad norm, tokens/s, MFU, memory), per skipped step
                              and per evaluation
      loss.png                the loss curve (`slm plot RUNDIR`)
      checkpoints/
        step-00000100/        a transformers model directory, opened as it is by AutoModelForCausalLM and
                              AutoTokenizer: config.json (model_type stablelm or llama), model.safetensors (fp32,
                              transformers' names), generation_config.json, the tokenizer files; plus
          manifest.json       kind "checkpoint": lineage (recipe, tokenizer hash, mix plan, parent checkpoint,
                              step, tokens seen) and `files`: every other file with its size and sha256
          train_state/        what an exact resume needs, the same whatever the engine and number of processes:
            state.json          step, samples and tokens seen, learning rate, bad-step counters, the engine and
                                world size that wrote it (for information), AdamW's step count
            optimizer.safetensors   AdamW's moments as full fp32 tensors named "<parameter>.exp_avg" and
                                "<parameter>.exp_avg_sq", <parameter> being the name in slm's model (fused
                                q/k/v and gate/up, as model.state_dict() names them); a tied output matrix is
                                its embedding's
            rng.pt              torch RNG states
        latest -> step-00000100

A checkpoint is written into step-N.tmp-* and renamed; `latest` is replaced by rename too. A killed save leaves
no directory that looks complete. Resuming takes the newest checkpoint whose files match its manifest (size and
sha256); one that does not is named and skipped, never deleted. A disk that fills while saving leaves the previous
checkpoints as they were and fails with one line. Files get the user's umask like every other file.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch

from slm.errors import SlmError
from slm.formats.manifest import (MANIFEST, check_writable, fsync_tree, input_entry, new_manifest, read_json,
                                  sha256_file, tree_sha256, write_json)
from slm.model.hf import from_hf_config, from_hf_state_dict, to_hf_config, to_hf_state_dict
from slm.model.transformer import ModelConfig

STEP_RE = re.compile(r"^step-(\d+)$")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "encoding.json",
                   "tokenizer.tiktoken", "chat_template.jinja")  # the last: a released model's template file
MOMENTS = ("exp_avg", "exp_avg_sq")  # AdamW's per-parameter state besides its step count


@dataclass
class OptimizerState:
    """AdamW's state in a layout that does not depend on the engine or the number of processes: the step count
    and, for each parameter by its name in slm's model, the full fp32 moments."""

    step: int
    moments: dict[str, dict[str, torch.Tensor]]  # name -> {"exp_avg": T, "exp_avg_sq": T}


def step_name(step: int) -> str:
    return f"step-{step:08d}"


def step_of(path: Path) -> int:
    return int(STEP_RE.match(Path(path).name).group(1))


def model_input(path: Path, role: str) -> dict:
    """A manifest input for a model directory (slm's or a released one): input_entry with the weights' sha256 and
    the tokenizer's hash, so that a model slm did not make is identified as well as one it did."""
    tok = Checkpoint(Path(path)).tokenizer()
    return input_entry(path, role, **({"tokenizer_sha256": tok.hash} if tok is not None else {}))


def checkpoints_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: Path, complete_only: bool = True) -> list[Path]:
    """step-N directories, oldest first (COMPLETE_ONLY: those with a config.json)."""
    d = checkpoints_dir(run_dir)
    if not d.is_dir():
        return []
    found = [p for p in d.iterdir() if STEP_RE.match(p.name) and p.is_dir()
             and (not complete_only or (p / "config.json").is_file())]
    return sorted(found, key=step_of)


def verify_checkpoint(path: Path, hashes: bool = True) -> str | None:
    """None when every file the manifest lists is there with its size (and, with HASHES, its sha256); otherwise
    what is wrong, in a few words. A checkpoint written before manifests listed their files passes if its weights
    and train_state/state.json are there."""
    path = Path(path)
    mpath = path / MANIFEST
    try:
        m = json.loads(mpath.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return "no manifest.json"
    except (OSError, ValueError):
        return "manifest.json is not valid JSON"
    files = m.get("files") if isinstance(m, dict) else None
    if files is None:
        for needed in ("config.json", "model.safetensors", "train_state/state.json"):
            if not (path / needed).is_file():
                return f"{needed} is missing"
        return None
    for f in files:
        p = path / f["path"]
        if not p.is_file():
            return f"{f['path']} is missing"
        size = p.stat().st_size
        if size != f["bytes"]:
            return f"{f['path']} has {size:,} bytes, the manifest says {f['bytes']:,}"
    if hashes:
        with ThreadPoolExecutor(max_workers=4) as pool:  # hashlib releases the GIL: files hash in parallel
            sums = list(pool.map(lambda f: sha256_file(path / f["path"]), files))
        for f, got in zip(files, sums):
            if got != f["sha256"]:
                return f"{f['path']} does not match its sha256 in the manifest"
    return None


# What a run directory holds besides its checkpoints (and the .tmp-* / .old-* of a directory being replaced)
RUN_ENTRIES = {"config.yaml", "metrics.jsonl", "progress.json", "loss.png", "checkpoints", "energy", "tokenizer",
               "reference_logprobs", "manifest.json", "dpo.json", "selfknow.json", ".task-eval"}
_REPLACING = re.compile(r"^(.+)\.(tmp|old)-[0-9a-f]{8}$")


def foreign_entries(run_dir: Path) -> list[str]:
    """The names in RUN_DIR that a run does not write (a directory that is not a run's, or not only a run's)."""
    if not Path(run_dir).is_dir():
        return []
    out = []
    for p in Path(run_dir).iterdir():
        m = _REPLACING.match(p.name)
        if p.name not in RUN_ENTRIES and not (m and m.group(1) in RUN_ENTRIES):
            out.append(p.name)
    return sorted(out)


def check_run_dir(run_dir: Path) -> str:
    """A run directory can be written at RUN_DIR: it does not exist ("absent"), is empty ("empty"), or holds only
    what runs write ("run": it is resumed); anything else is refused, as the other stages refuse to replace a
    directory they did not write."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise SlmError(f"{run_dir}: exists and is not a directory (--out is a run directory)")
    foreign = foreign_entries(run_dir)
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise SlmError(f"{run_dir}: exists and holds what a run does not write ({shown}); choose another --out")
    check_writable(run_dir / "checkpoints")
    return "absent" if not run_dir.exists() else "run" if any(run_dir.iterdir()) else "empty"


def discard_failed_run(run_dir: Path, was: str) -> bool:
    """Undo what a run that failed before its first checkpoint wrote in RUN_DIR, which WAS "absent" or "empty"
    before it started (check_run_dir), saying so: no half directories. One with a checkpoint stays, to resume.
    True when it was undone."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir() or list_checkpoints(run_dir, complete_only=False) or foreign_entries(run_dir):
        return False
    from slm.console import warn

    if was == "absent":
        shutil.rmtree(run_dir, ignore_errors=True)
    else:
        for p in run_dir.iterdir():
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
    warn(f"{run_dir}: {'removed' if was == 'absent' else 'emptied'} (the run failed before its first checkpoint: "
         "nothing to resume from)")
    return True


_skipped: set[Path] = set()  # checkpoints already named on stderr as skipped, once per process


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint whose files are all there with their sizes (no hashing: cheap enough to open a
    model with); resuming checks the hashes too (newest_verified). A newer one that is not complete is named on
    stderr, with what is wrong and the one used instead."""
    skipped = []
    for p in reversed(list_checkpoints(run_dir, complete_only=False)):
        why = verify_checkpoint(p, hashes=False)
        if why is None:
            _warn_skipped(skipped, p)
            return p.resolve()
        if p not in _skipped:
            skipped.append((p, why))
    _warn_skipped(skipped, None)
    return None


def _warn_skipped(skipped: list[tuple[Path, str]], used: Path | None) -> None:
    from slm.console import warn

    for p, why in skipped:
        _skipped.add(p)
        warn(f"{p}: skipped, not a complete checkpoint ({why}); "
             + (f"using the older {used.name}" if used is not None else "no older checkpoint to use"))


def newest_verified(run_dir: Path, on_skip=None) -> Path | None:
    """The newest checkpoint whose every file matches the manifest's size and sha256. ON_SKIP(path, why) is told
    of each newer one that does not (they are left where they are)."""
    for p in reversed(list_checkpoints(run_dir, complete_only=False)):
        why = verify_checkpoint(p)
        if why is None:
            return p.resolve()
        if on_skip is not None:
            _skipped.add(p)
            on_skip(p, why)
    return None


def _point_latest(run_dir: Path, name: str) -> None:
    d = checkpoints_dir(run_dir)
    tmp = d / f".latest.tmp-{uuid.uuid4().hex[:8]}"
    os.symlink(name, tmp)
    os.replace(tmp, d / "latest")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def _disk_full(e: BaseException) -> bool:
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(e)  # safetensors and torch.save wrap the OS error in their own exceptions
    return "No space left on device" in text or "os error 28" in text or "Disk quota exceeded" in text


def _free_bytes(path: Path) -> int:
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return -1


def write_model_dir(directory: Path, state_dict: dict[str, torch.Tensor], model_cfg: ModelConfig, tokenizer_dir: Path,
                    bos_id: int | None, eos_id: int | None) -> Path:
    """A bare transformers directory (weights, config, tokenizer; no manifest or training state) of STATE_DICT, for
    a tool to read at once (train.eval_tasks' lm-eval); not a checkpoint."""
    directory = Path(directory)
    directory.mkdir(parents=True)
    _write_model_files(directory, _hf_tensors(state_dict, model_cfg), model_cfg, tokenizer_dir, bos_id, eos_id)
    return directory


def _hf_tensors(state_dict: dict[str, torch.Tensor], model_cfg: ModelConfig) -> dict[str, torch.Tensor]:
    hf = to_hf_state_dict(state_dict, model_cfg)
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in hf.items()}


def _write_model_files(directory: Path, hf: dict[str, torch.Tensor], model_cfg: ModelConfig, tokenizer_dir: Path,
                       bos_id: int | None, eos_id: int | None) -> None:
    """What transformers reads in a model directory: weights, config.json, generation_config.json, the tokenizer."""
    from safetensors.torch import save_file

    save_file(hf, str(directory / "model.safetensors"), metadata={"format": "pt"})
    write_json(directory / "config.json", to_hf_config(model_cfg, bos_id, eos_id, "float32"))
    write_json(directory / "generation_config.json", {"bos_token_id": bos_id, "eos_token_id": eos_id,
                                                      "do_sample": False})
    for name in TOKENIZER_FILES:
        if (Path(tokenizer_dir) / name).is_file():
            shutil.copyfile(Path(tokenizer_dir) / name, directory / name)


def write_checkpoint(run_dir: Path, step: int, *, model_cfg: ModelConfig, state_dict: dict[str, torch.Tensor],
                     tokenizer_dir: Path, lineage: dict, train_state: dict, optimizer: OptimizerState | None,
                     rng_state: dict | None, keep: int, bos_id: int | None, eos_id: int | None,
                     on_replace=None) -> Path:
    """Write RUNDIR/checkpoints/step-N atomically, point `latest` at it, keep the newest KEEP.

    STATE_DICT is the model's full state under slm's names. A directory already at step-N (one that resuming
    skipped because it did not verify) is moved aside to step-N.replaced-* (ON_REPLACE(old, new) is told)."""
    from safetensors.torch import save_file

    d = checkpoints_dir(run_dir)
    d.mkdir(parents=True, exist_ok=True)
    final = d / step_name(step)
    hf = _hf_tensors(state_dict, model_cfg)
    tensors = {}
    if optimizer is not None:
        for name, m in optimizer.moments.items():
            for key in MOMENTS:
                tensors[f"{name}.{key}"] = m[key].detach().to("cpu", torch.float32).contiguous()
    needed = (sum(t.numel() * 4 for t in hf.values()) + sum(t.numel() * 4 for t in tensors.values())
              + sum((Path(tokenizer_dir) / n).stat().st_size for n in TOKENIZER_FILES
                    if (Path(tokenizer_dir) / n).is_file()) + (1 << 20))
    free = _free_bytes(d)
    if 0 <= free < needed:
        raise SlmError(f"{d}: no room for checkpoint {final.name}: it needs about {human_bytes(needed)} and "
                       f"{human_bytes(free)} are free; the previous checkpoints are kept (free some space or lower "
                       "train.keep, then run the same command again)")
    tmp = d / f"{step_name(step)}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        mode = 0o666 & ~_umask()
        _write_model_files(tmp, hf, model_cfg, tokenizer_dir, bos_id, eos_id)
        ts = tmp / "train_state"
        ts.mkdir()
        if optimizer is not None:
            save_file(tensors, str(ts / "optimizer.safetensors"), metadata={"format": "slm-adamw",
                                                                            "step": str(optimizer.step)})
            train_state = dict(train_state, optimizer={"type": "AdamW", "step": optimizer.step})
        write_json(ts / "state.json", train_state)
        if rng_state is not None:
            torch.save(rng_state, ts / "rng.pt")
        files = []
        for p in sorted(q for q in tmp.rglob("*") if q.is_file()):
            os.chmod(p, mode)  # safetensors creates its files 0600 whatever the umask
            files.append(p)
        with ThreadPoolExecutor(max_workers=4) as pool:
            sums = list(pool.map(sha256_file, files))
        listing = [{"path": p.relative_to(tmp).as_posix(), "bytes": p.stat().st_size, "sha256": h}
                   for p, h in zip(files, sums)]
        write_json(tmp / MANIFEST, new_manifest(
            "checkpoint", {"model": model_cfg.to_dict()}, counts={"step": step,
                                                                 "tokens_seen": train_state.get("tokens_seen")},
            files=listing, **lineage))
        os.chmod(tmp / MANIFEST, mode)
        fsync_tree(tmp)
        if final.exists():
            aside = d / f"{final.name}.replaced-{uuid.uuid4().hex[:8]}"
            os.replace(final, aside)
            if on_replace is not None:
                on_replace(final, aside)
        os.replace(tmp, final)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if _disk_full(e) or (isinstance(e, (OSError, RuntimeError)) and 0 <= _free_bytes(d) < needed):
            raise SlmError(f"{d}: the disk filled while writing checkpoint {final.name} (it needs about "
                           f"{human_bytes(needed)}, {human_bytes(max(_free_bytes(d), 0))} are free); the previous "
                           "checkpoints are kept: free some space, then run the same command again") from None
        raise
    _point_latest(run_dir, final.name)
    _prune(run_dir, step, keep)
    return final


def _prune(run_dir: Path, step: int, keep: int) -> None:
    """Keep the newest KEEP checkpoints up to STEP; remove what killed saves left."""
    older = [p for p in list_checkpoints(run_dir, complete_only=False) if step_of(p) < step]
    for old in older[:max(0, len(older) - (max(1, keep) - 1))]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in checkpoints_dir(run_dir).glob("step-*.tmp-*"):  # left by a killed save
        shutil.rmtree(stale, ignore_errors=True)


def run_name(path: Path) -> str:
    """The name a model is known by: its run's for a checkpoint inside a run (RUN/checkpoints/step-N), else its own."""
    path = Path(path)
    return path.parent.parent.name if path.parent.name == "checkpoints" else path.name


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
        where = str(self.dir / "config.json")
        if not isinstance(self.hf_config, dict):
            raise SlmError(f"{where}: expected a JSON object (a transformers model config)")
        try:
            return from_hf_config(self.hf_config, where)
        except KeyError as e:
            raise SlmError(f"{where}: missing {e.args[0]!r}") from None
        except ValueError as e:
            msg = str(e).strip("'\"")
            raise SlmError(msg if msg.startswith(where) else f"{where}: {msg}") from None
        except TypeError:
            raise SlmError(f"{where}: a field has the wrong type (numbers where numbers belong)") from None

    @property
    def run_dir(self) -> Path | None:
        """The run directory this checkpoint belongs to (None for a checkpoint standing alone)."""
        return self.dir.parent.parent if self.dir.parent.name == "checkpoints" else None

    @cached_property
    def recorded_weights_sha256(self) -> str | None:
        """The sha256 of model.safetensors as the manifest records it (None for a checkpoint slm did not write)."""
        made = {f.get("path"): f.get("sha256") for f in (self.manifest or {}).get("files", []) if isinstance(f, dict)}
        return made.get("model.safetensors")

    def weights_sha256(self) -> str:
        """The weights' identity: the recorded sha256, else computed from model.safetensors (or, for sharded
        weights, from the index and every shard)."""
        if self.recorded_weights_sha256:
            return self.recorded_weights_sha256
        if (self.dir / "model.safetensors").is_file():
            return sha256_file(self.dir / "model.safetensors")
        index = self.dir / "model.safetensors.index.json"
        if index.is_file():
            shards = sorted({self.dir / s for s in (read_json(index).get("weight_map") or {}).values()})
            return tree_sha256(self.dir, [index, *shards])
        self.hf_state_dict()  # the one-line error: no weights, or only a pickle
        return ""

    @cached_property
    def manifest(self) -> dict | None:
        p = self.dir / MANIFEST
        if not p.is_file():
            return None
        m = read_json(p)
        return m if isinstance(m, dict) and m.get("kind") == "checkpoint" else None

    @cached_property
    def train_state(self) -> dict | None:
        p = self.dir / "train_state" / "state.json"
        if not p.is_file():
            return None
        state = read_json(p)
        if not isinstance(state, dict):
            raise SlmError(f"{p}: expected a JSON object (step, tokens seen, data position)")
        return state

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
        if (self.dir / "pytorch_model.bin").is_file() or (self.dir / "pytorch_model.bin.index.json").is_file():
            raise SlmError(f"{self.dir}: pytorch_model.bin only: slm reads safetensors, not pickles (a pickle runs "
                           "code when loaded); convert it once where you trust it: "
                           "AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(OUT, safe_serialization=True)")
        raise SlmError(f"{self.dir}: no weights (model.safetensors, or shards with model.safetensors.index.json)")

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Weights under slm's names (fused q/k/v and gate/up)."""
        from safetensors import SafetensorError

        cfg = self.model_config
        try:
            hf = self.hf_state_dict()
        except SafetensorError as e:
            raise SlmError(f"{self.dir}: the weights are not a readable safetensors file ({e})") from None
        try:
            return from_hf_state_dict(hf, cfg)
        except KeyError as e:
            raise SlmError(f"{self.dir}: {e.args[0]}") from None
        except RuntimeError as e:  # a tensor whose shape is not the config's
            raise SlmError(f"{self.dir}: the weights do not match config.json ({str(e).splitlines()[0]})") from None

    def optimizer_state(self, legacy_order: list[str] | None = None) -> OptimizerState | None:
        """AdamW's state (train_state/optimizer.safetensors), or None. LEGACY_ORDER names the parameters in the
        optimizer's order, to read the optimizer.pt that slm wrote before 0.2 (torch's state_dict by index)."""
        from safetensors import SafetensorError
        from safetensors.torch import safe_open

        path = self.dir / "train_state" / "optimizer.safetensors"
        if path.is_file():
            moments: dict[str, dict[str, torch.Tensor]] = {}
            try:
                with safe_open(str(path), framework="pt") as f:
                    step = int((f.metadata() or {}).get("step", (self.train_state or {}).get("optimizer", {})
                                                        .get("step", 0)))
                    for key in f.keys():
                        name, _, kind = key.rpartition(".")
                        if kind not in MOMENTS:
                            raise SlmError(f"{path}: unexpected tensor {key!r} (expected <parameter>.exp_avg or "
                                           "<parameter>.exp_avg_sq)")
                        moments.setdefault(name, {})[kind] = f.get_tensor(key)
            except SafetensorError as e:
                raise SlmError(f"{path}: not a readable safetensors file ({e})") from None
            return OptimizerState(step, moments)
        legacy = self.dir / "train_state" / "optimizer.pt"
        if legacy.is_file() and legacy_order is not None:
            sd = torch.load(legacy, map_location="cpu", weights_only=True)
            moments, step = {}, 0
            for i, s in sd.get("state", {}).items():
                if int(i) >= len(legacy_order):
                    raise SlmError(f"{legacy}: {len(sd['state'])} parameters, the model has {len(legacy_order)}")
                moments[legacy_order[int(i)]] = {k: s[k] for k in MOMENTS}
                step = int(s["step"])
            return OptimizerState(step, moments)
        return None

    def rng_state(self) -> dict | None:
        p = self.dir / "train_state" / "rng.pt"
        return torch.load(p, map_location="cpu", weights_only=True) if p.is_file() else None

    @property
    def step(self) -> int:
        return int((self.train_state or {}).get("step", 0))

    def tokenizer(self):
        """The tokenizer stored with the checkpoint: slm's (encoding.json + ranks) or a released tokenizer.json;
        None when it has neither."""
        from slm.formats.tokenizer import Tokenizer

        if not (self.dir / "encoding.json").is_file() and not (self.dir / "tokenizer.json").is_file():
            return None
        tok = Tokenizer(self.dir)
        if tok.backend == "hf" and (self.dir / "config.json").is_file() and tok.n_vocab > self.model_config.vocab_size:
            # a released directory whose files disagree (slm checks its own when it writes them)
            raise SlmError(f"{self.dir}: its tokenizer has {tok.n_vocab:,} ids, more than config.json's vocab_size "
                           f"{self.model_config.vocab_size:,}: not this model's tokenizer")
        return tok

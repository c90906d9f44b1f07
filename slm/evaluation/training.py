"""Task scores during training (train.eval_tasks): the model's current weights scored by `slm eval`'s own code
(slm.evaluation.scoring over lm-eval), every eval_every steps and at the end, on rank 0 while the other ranks wait.

An entry is NAME or NAME:LIMIT: an lm-eval task, a suite of slm/evaluation/suites.yaml (slm-local: slm's offline
tasks) or a task in train.eval_include_path; LIMIT is the examples per task (default train.eval_limit). The weights
go to a transformers directory under RUN/.task-eval/ (removed after each evaluation), which lm-eval's `hf` model
reads exactly as `slm eval` reads a checkpoint: a run's score at its last step equals `slm eval` of the saved
checkpoint on the same task and limit.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

from slm.errors import SlmError
from slm.evaluation.local import METRICS, SHOTS, TASKS, write_tasks
from slm.evaluation.scoring import (TaskSpec, _quiet, check_datasets, evaluate_model, load_suites, suite_specs,
                                    task_manager)

WORK = ".task-eval"


@dataclass
class Scheduled:
    spec: TaskSpec
    limit: int


def parse_entries(entries: list, default_limit: int) -> list[Scheduled]:
    """train.eval_tasks into task specs with their limits (a suite becomes its tasks)."""
    if not isinstance(entries, list):
        raise SlmError(f"train.eval_tasks: expected a list of NAME or NAME:LIMIT, got {entries!r}")
    suites, out = load_suites(), []
    for entry in entries:
        name, _, limit = str(entry).partition(":")
        try:
            n = int(limit) if limit else default_limit
        except ValueError:
            n = 0
        if not name or n < 1:
            raise SlmError(f"train.eval_tasks: {entry!r}: expected NAME or NAME:LIMIT with LIMIT a positive integer")
        if name in suites:
            out += [Scheduled(spec, n) for spec in suite_specs(name)[0]]
        else:
            metric = ",".join(METRICS[name]) if name in METRICS else None
            out.append(Scheduled(TaskSpec(name, SHOTS.get(name), metric), n))
    return out


class TaskScorer:
    """Rank 0's scorer: the tasks checked (names and datasets) when the run starts, scored on demand."""

    def __init__(self, run_dir: Path, entries: list, default_limit: int, include: list, seed: int, batch_size: int):
        _quiet()
        self.run_dir, self.seed, self.batch_size = Path(run_dir), seed, batch_size
        self.scheduled = parse_entries(entries, default_limit)
        self.work = self.run_dir / WORK
        shutil.rmtree(self.work, ignore_errors=True)
        self.work.mkdir(parents=True)
        paths = [Path(p) for p in include]
        for p in paths:
            if not p.is_dir():
                raise SlmError(f"train.eval_include_path: {p}: no such directory")
        if any(s.spec.task in TASKS for s in self.scheduled):
            paths.insert(0, write_tasks(self.work / "tasks", seed=0))
        specs = [s.spec for s in self.scheduled]
        self.tm = task_manager(specs, paths, ("train.eval_tasks", "train.eval_include_path"))
        check_datasets(self.tm, specs)

    def describe(self) -> str:
        return ", ".join(f"{s.spec.task} ({s.limit})" for s in self.scheduled)

    def score(self, write_model) -> tuple[dict, float]:
        """({task: the reported number}, seconds): WRITE_MODEL(DIR) writes the current weights as a transformers
        directory; lm-eval's hf model scores it."""
        from slm.evaluation.models import make_lm

        started = time.perf_counter()
        model_dir = self.work / "model"
        shutil.rmtree(model_dir, ignore_errors=True)
        write_model(model_dir)
        lm = make_lm("hf", model_dir, None, self.seed, self.batch_size)
        scores = {}
        try:
            for limit in sorted({s.limit for s in self.scheduled}):
                specs = [s.spec for s in self.scheduled if s.limit == limit]
                cfg = SimpleNamespace(limit=limit, bootstrap_iters=0, seed=self.seed)
                got = evaluate_model(lm, "training", specs, self.tm, cfg, False, self.work / "lm-eval")
                scores.update({task: r["value"] for task, r in got.items()})
        finally:
            del lm
            shutil.rmtree(model_dir, ignore_errors=True)
            shutil.rmtree(self.work / "lm-eval", ignore_errors=True)
        return scores, time.perf_counter() - started

    def close(self) -> None:
        shutil.rmtree(self.work, ignore_errors=True)


def task_scorer(run) -> TaskScorer:
    """The scorer of a training run's train.eval_tasks (slm.train.loop.Run.task_scorer)."""
    t = run.train
    return TaskScorer(run.run_dir, t.eval_tasks, t.eval_limit, t.eval_include_path, t.seed, 8)

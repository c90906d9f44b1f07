"""Scoring with lm-eval, shared by `slm eval` and the scores a training run takes as it goes (train.eval_tasks):
which tasks (suites, lm-eval names, slm's local ones), lm-eval's task manager over them, and one model's scores.

Built on lm-eval (not a re-implementation): lm_eval.simple_evaluate does the scoring; this module picks the
reported number of each task and keeps lm-eval's own output files.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from slm.console import err
from slm.errors import SlmError, UsageError

SUITES_FILE = Path(__file__).resolve().parent / "suites.yaml"


@dataclass(frozen=True)
class TaskSpec:
    task: str
    shots: int | None  # None: the task's own default
    metric: str | None  # "metric,filter"; None: the first metric lm-eval reports


def load_suites() -> dict:
    import yaml

    return yaml.safe_load(SUITES_FILE.read_text(encoding="utf-8"))


def suite_specs(name: str) -> tuple[list[TaskSpec], dict]:
    suites = load_suites()
    if name not in suites:
        raise UsageError(f"--suite {name!r}: expected one of {', '.join(suites)}")
    s = suites[name]
    items = list(s.get("tasks") or [])
    for lang in s.get("languages") or []:
        items += [dict(t, task=t["task"].format(lang=lang)) for t in s["per_language"]]
    return [TaskSpec(t["task"], t.get("shots"), t.get("metric")) for t in items], s


def _quiet() -> None:
    if os.environ.get("SLM_DEBUG"):
        return
    for name in ("lm_eval", "lm-eval", "datasets", "transformers", "evaluate"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TQDM_DISABLE", "1")  # lm-eval's own bars; slm shows one


@contextlib.contextmanager
def _no_bars():
    """lm-eval's models draw their own tqdm bars (some with `disable` given, so TQDM_DISABLE does not reach them):
    they go nowhere, and slm's bar (pinned to the real stderr) stays the one shown. Logging keeps its own stream;
    SLM_DEBUG keeps the bars."""
    if os.environ.get("SLM_DEBUG"):
        yield
        return
    import io
    import sys

    saved = err._file
    err.file = sys.stderr
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        err._file = saved


def task_manager(specs: list[TaskSpec], include: list[Path], where: tuple[str, str] = ("--tasks", "--include-path")):
    """lm-eval's TaskManager over INCLUDE (and its built-in tasks only when a name needs them: indexing them takes
    tens of seconds); every name is checked to exist before anything runs. WHERE: the settings that named the
    tasks and the include path, for the message."""
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=[str(p) for p in include] or None, include_defaults=False) if include else None
    if tm is None or any(s.task not in tm.all_tasks for s in specs):
        tm = TaskManager(include_path=[str(p) for p in include] or None)
    unknown = [s.task for s in specs if s.task not in tm.all_tasks]
    if unknown:
        raise SlmError(f"{where[0]}: {unknown[0]!r} is not an lm-eval task (nor one in {where[1]}); "
                       "`lm-eval ls tasks` lists them")
    return tm


def _leaf_tasks(tm, name: str) -> list[str]:
    from lm_eval.tasks._index import Kind

    e = tm.task_index[name]
    if e.kind in (Kind.TASK, Kind.PY_TASK):
        return [name]
    if e.kind == Kind.TAG:
        return sorted(e.tags)
    out = []
    for item in (e.cfg or {}).get("task", []):
        child = item if isinstance(item, str) else item.get("task") or item.get("group")
        if isinstance(child, str) and child in tm.task_index:
            out += _leaf_tasks(tm, child)
    return out


def dataset_of(tm, name: str) -> str:
    """The dataset(s) a task (or group) reads, as lm-eval's YAML names them."""
    seen = []
    leaves = _leaf_tasks(tm, name)
    for leaf in leaves:
        cfg = tm.task_index[leaf].cfg or {}
        d = cfg.get("dataset_path")
        if cfg.get("dataset_name") and len(leaves) == 1:
            d = f"{d} ({cfg['dataset_name']})"
        if d and d not in seen:
            seen.append(d)
    return ", ".join(seen[:3]) + (f" and {len(seen) - 3} more" if len(seen) > 3 else "") if seen else "its dataset"


def check_datasets(tm, specs: list[TaskSpec]) -> None:
    """Load every task's data once before any model runs: a missing dataset fails here in one line."""
    from datasets.exceptions import DatasetNotFoundError

    for s in specs:
        try:
            tm.load([s.task])
        except (ConnectionError, DatasetNotFoundError, FileNotFoundError, RuntimeError, OSError) as e:
            raise SlmError(
                f"task {s.task}: its dataset {dataset_of(tm, s.task)} is not available here ({type(e).__name__}). "
                "Run once with network access (datasets caches it in ~/.cache/huggingface, or HF_DATASETS_CACHE), "
                "point HF_DATASETS_CACHE at a copy of such a cache, or give the task over local files with "
                "--include-path DIR") from None


def pick(res: dict, spec: TaskSpec) -> dict:
    """The reported number of SPEC in one lm-eval result (a task's or a group's)."""
    table = res.get("groups", {}).get(spec.task) or res["results"].get(spec.task)
    if table is None:
        raise SlmError(f"task {spec.task}: lm-eval returned no result for it")
    metric = spec.metric
    if metric is None or metric not in table:
        names = [k for k in table if "," in k and "_stderr" not in k]
        if metric is not None and metric not in table:
            raise SlmError(f"task {spec.task}: no metric {metric!r} in lm-eval's result (it has {', '.join(names)})")
        metric = names[0]
    name, filt = metric.split(",", 1)
    stderr = table.get(f"{name}_stderr,{filt}")
    n = res.get("n-samples", {}).get(spec.task, {}).get("effective")
    return {"metric": metric, "value": table[metric], "stderr": stderr if isinstance(stderr, (int, float)) else None,
            "n": n, "shots": res.get("n-shot", {}).get(spec.task, spec.shots),
            "higher_is_better": res.get("higher_is_better", {}).get(spec.task, {}).get(name)}


def evaluate_model(lm, label: str, specs: list[TaskSpec], tm, cfg, chat: bool, out: Path) -> dict:
    """Run every spec on one model (one lm-eval call per number of shots); lm-eval's files go to OUT/LABEL."""
    import lm_eval
    from lm_eval.loggers import EvaluationTracker

    groups: dict[int | None, list[TaskSpec]] = {}
    for s in specs:
        groups.setdefault(s.shots, []).append(s)
    scores = {}
    for shots, group in groups.items():
        tracker = EvaluationTracker(output_path=str(out))
        with _no_bars():
            res = lm_eval.simple_evaluate(
                model=lm, model_args={"pretrained": label}, tasks=[s.task for s in group], num_fewshot=shots,
                limit=cfg.limit, log_samples=True, evaluation_tracker=tracker, task_manager=tm,
                bootstrap_iters=cfg.bootstrap_iters, apply_chat_template=chat, fewshot_as_multiturn=chat,
                random_seed=cfg.seed, numpy_random_seed=cfg.seed, torch_random_seed=cfg.seed,
                fewshot_random_seed=cfg.seed)
        samples = res.pop("samples", {})
        tracker.save_results_aggregated(results=res, samples=samples)
        for task in res.get("configs", {}):
            tracker.save_results_samples(task_name=task, samples=samples[task])
        for s in group:
            scores[s.task] = pick(res, s)
    return scores



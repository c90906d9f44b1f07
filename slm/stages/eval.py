"""`slm eval`: score checkpoints and GGUF files on lm-evaluation-harness tasks, side by side.

Built on lm-eval (not a re-implementation): checkpoints run through its `hf` model (they are transformers
directories), GGUF files through slm's `slm-gguf` model (slm.evaluation.llamacpp: llama.cpp in this process), so a
quantized file is scored as it is. Suites are data (slm/evaluation/suites.yaml: the papers' tasks, shots and
metrics); `slm-local` is slm's own offline task set (slm.evaluation.local), made at run time from the embedded
corpus. A task whose dataset is not available gets one line saying which dataset and how to provide it.

OUT/
    eval.json          the summary: per model and task, the reported metric with its standard error and n
    eval.md            the same as a markdown table (also on stderr)
    lm-eval/LABEL/     lm-eval's own results_*.json and samples_TASK_*.jsonl (per-sample logs), per model
    tasks/             the local tasks' YAML and data, when used
    mt_bench.json      with --mt-bench: answers, judgements, per-category and mean scores
    manifest.json      kind "eval"
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from slm import energy
from slm.console import err, progress
from slm.errors import AT_LEAST_0, POSITIVE, SlmError, UsageError, check_ranges
from slm.evaluation.local import METRICS, SHOTS, TASKS, write_tasks
from slm.evaluation.models import make_lm, model_backend
from slm.evaluation.mtbench import read_questions, run_mt_bench
from slm.formats.checkpoint import run_name
from slm.formats.manifest import atomic_dir, check_replaceable, new_manifest, write_json
from slm.formats.tables import bar_chart, render_eval

SUITES_FILE = Path(__file__).resolve().parent.parent / "evaluation" / "suites.yaml"


@dataclass(frozen=True)
class TaskSpec:
    task: str
    shots: int | None  # None: the task's own default
    metric: str | None  # "metric,filter"; None: the first metric lm-eval reports


@dataclass
class EvalConfig:
    models: list[Path]
    out: Path
    suite: str | None = None
    tasks: list[str] = field(default_factory=list)
    include_path: list[Path] = field(default_factory=list)
    shots: int | None = None
    limit: float | None = None
    batch_size: int = 8
    chat_template: bool | None = None
    """Render prompts with each model's chat template (default: the suite's setting, else off)."""
    threads: int | None = None
    seed: int = 1234
    bootstrap_iters: int = 1000
    plot: Path | None = None
    mt_bench: Path | None = None
    judge: str | None = None
    judge_model: str | None = None
    """With an HTTP judge: the model name the endpoint expects."""

    def __post_init__(self):  # --limit: a count, or a fraction of each task below 1
        check_ranges(self, shots=AT_LEAST_0, limit=POSITIVE, batch_size=POSITIVE, threads=POSITIVE,
                     seed=AT_LEAST_0, bootstrap_iters=AT_LEAST_0)


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


def task_specs(cfg: EvalConfig) -> tuple[list[TaskSpec], bool]:
    """The tasks to run and whether prompts go through the chat template."""
    if bool(cfg.suite) == bool(cfg.tasks) and not cfg.mt_bench:
        raise UsageError("give --suite NAME or --tasks a,b (or --mt-bench FILE)")
    specs, chat = [], False
    if cfg.suite:
        specs, suite = suite_specs(cfg.suite)
        chat = bool(suite.get("chat_template"))
        if cfg.shots is not None:
            specs = [TaskSpec(s.task, cfg.shots, s.metric) for s in specs]

    for name in cfg.tasks:
        shots = cfg.shots if cfg.shots is not None else SHOTS.get(name)
        metric = ",".join(METRICS[name]) if name in METRICS else None
        specs.append(TaskSpec(name, shots, metric))
    return specs, chat if cfg.chat_template is None else cfg.chat_template


def labels_for(models: list[Path]) -> list[str]:
    """Short unique names: the file stem of a GGUF, the run's name for a checkpoint."""
    out = []
    for m in models:
        m = Path(m)
        name = m.stem if m.is_file() else run_name(m)
        base, i = name, 2
        while name in out:
            name, i = f"{base}-{i}", i + 1
        out.append(name)
    return out


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


def task_manager(specs: list[TaskSpec], include: list[Path]):
    """lm-eval's TaskManager over INCLUDE (and its built-in tasks only when a name needs them: indexing them takes
    tens of seconds); every name is checked to exist before anything runs."""
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=[str(p) for p in include] or None, include_defaults=False) if include else None
    if tm is None or any(s.task not in tm.all_tasks for s in specs):
        tm = TaskManager(include_path=[str(p) for p in include] or None)
    unknown = [s.task for s in specs if s.task not in tm.all_tasks]
    if unknown:
        raise SlmError(f"--tasks: {unknown[0]!r} is not an lm-eval task (nor one in --include-path); "
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


def evaluate_model(lm, label: str, specs: list[TaskSpec], tm, cfg: EvalConfig, chat: bool, out: Path) -> dict:
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


def run(cfg: EvalConfig) -> Path:
    started = time.time()
    check_replaceable(cfg.out)
    specs, chat = task_specs(cfg)
    if not cfg.models:
        raise SlmError("MODEL: give at least one checkpoint, run directory or .gguf file")
    for p in cfg.include_path:
        if not Path(p).is_dir():
            raise SlmError(f"--include-path {p}: no such directory")
    if cfg.judge and not cfg.mt_bench:
        raise UsageError("--judge: give the questions with --mt-bench FILE")
    models = [model_backend(Path(m)) for m in cfg.models]
    labels = labels_for(cfg.models)
    questions = None
    if cfg.mt_bench:

        questions = read_questions(Path(cfg.mt_bench))
        if not cfg.judge:
            raise UsageError("--mt-bench: give the judge with --judge (a checkpoint, a .gguf file or an http(s) URL)")
    _quiet()

    report: dict = {"suite": cfg.suite, "tasks": [asdict(s) for s in specs], "chat_template": chat, "models": []}
    with atomic_dir(cfg.out) as tmp:
        include = list(cfg.include_path)
        if any(s.task in TASKS for s in specs):
            include.insert(0, write_tasks(tmp / "tasks", seed=0))
        tm = task_manager(specs, include) if specs else None
        if specs:
            check_datasets(tm, specs)
        with progress() as bar:
            job = bar.add_task("eval", total=len(models))
            for (backend, path), label in zip(models, labels):
                bar.update(job, description=f"eval {label} ({backend})")
                entry = {"model": str(path), "label": label, "backend": backend}
                if specs:
                    lm = make_lm(backend, path, cfg.threads, cfg.seed, cfg.batch_size)
                    entry["scores"] = evaluate_model(lm, label, specs, tm, cfg, chat, tmp / "lm-eval")
                    del lm
                report["models"].append(entry)
                bar.advance(job)
        if questions is not None:

            report["mt_bench"] = run_mt_bench(questions, models, labels, cfg)
            write_json(tmp / "mt_bench.json", report["mt_bench"])
        import lm_eval

        report["lm_eval_version"] = getattr(lm_eval, "__version__", None)
        write_json(tmp / "eval.json", report)
        table = render_eval(report)
        (tmp / "eval.md").write_text(table + "\n")
        if cfg.plot is not None:
            plot(report, tmp / "eval.png")
        inputs = ([{"path": str(p), "role": "model"} for _, p in models]
                  + [{"path": str(p), "role": "tasks"} for p in cfg.include_path]
                  + ([{"path": str(cfg.mt_bench), "role": "questions"}] if cfg.mt_bench else [])
                  + ([{"path": cfg.judge, "role": "judge"}] if cfg.judge else []))
        write_json(tmp / "manifest.json", new_manifest(
            "eval", {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()
                     if k not in ("models", "out")} | {"include_path": [str(p) for p in cfg.include_path]},
            inputs=inputs, counts={"models": len(models), "tasks": len(specs)}, started=started, energy=energy.take()))
    err.print(table, soft_wrap=True, markup=False, highlight=False)
    if cfg.plot is not None:
        import shutil

        shutil.copyfile(Path(cfg.out) / "eval.png", cfg.plot)
    return Path(cfg.out)


def plot(report: dict, path: Path) -> None:
    """Each task's reported metric, a bar per model."""
    tasks, models = [t["task"] for t in report["tasks"]], report["models"]
    metric = {t: (models[0]["scores"][t]["metric"] if models else "").split(",")[0] for t in tasks}
    bar_chart(path, [f"{t}\n{metric[t]}" for t in tasks],
              {m["label"]: [m["scores"][t]["value"] for t in tasks] for m in models})

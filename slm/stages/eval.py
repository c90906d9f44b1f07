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

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from slm import energy
from slm.console import err, progress
from slm.errors import AT_LEAST_0, POSITIVE, SlmError, UsageError, check_ranges
from slm.evaluation.local import METRICS, SHOTS, TASKS, write_tasks
from slm.evaluation.scoring import (TaskSpec, _no_bars, _quiet, check_datasets, evaluate_model,  # noqa: F401
                                    load_suites, pick, suite_specs, task_manager)
from slm.evaluation.models import make_lm, model_backend
from slm.evaluation.mtbench import read_questions, run_mt_bench
from slm.formats.checkpoint import run_name
from slm.formats.manifest import atomic_dir, check_replaceable, new_manifest, write_json
from slm.formats.tables import bar_chart, render_eval



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

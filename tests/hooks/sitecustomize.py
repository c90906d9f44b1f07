"""Test hooks: hold a training process at a step until the test lets it go; poison the loss of chosen steps.

Tests that signal or kill a run while it trains must not race the machine's speed (a fast CPU finishes a 300-step
run before a poll sees it running). A test puts this directory first on PYTHONPATH and sets:

    SLM_TEST_GATE=PATH         the gate: while the file PATH exists, a process that reached the step waits
    SLM_TEST_GATE_STEP=K       the step (0-based, as metrics.jsonl numbers them) after whose record a process waits

When a process reaches the step it writes PATH.reached-PID, then waits while PATH exists. A SIGTERM, SIGUSR1 or
SIGINT that reaches it after that point writes PATH.signal-PID before slm's own handler runs, so a test can let the
run go on only once the signal has arrived.

    SLM_TEST_LOSS=K:KIND,...   the loss of step K (0-based) is made NaN (KIND nan: an overflow) or multiplied by N
                               (KIND xN: a poisoned batch, a loss spike), in every process of the run
    SLM_TEST_SAMPLES_PER_STEP  the run's sequences per step (to tell the step from the batch asked for; default 8)
    SLM_TEST_LOSS_RANK=R       only in the process of rank R (the others compute their losses as they are)

    SLM_TEST_WRITE_GATE=PATH   hold the background checkpoint writer (train.async_save) in the middle of writing
    SLM_TEST_WRITE_GATE_STEP=K step K's checkpoint (after model.safetensors, before config.json) while PATH exists;
                               it writes PATH.writing-PID when it is held there

Without these variables this file does nothing. It never ships: it lives under tests/ and only a test's environment
names it.
"""

import os

_GATE = os.environ.get("SLM_TEST_GATE")

_LOSS = os.environ.get("SLM_TEST_LOSS")
_WRITE_GATE = os.environ.get("SLM_TEST_WRITE_GATE")
_AFTER_IMPORT = {}  # module name -> what to patch in it once imported

if _GATE or _LOSS or _WRITE_GATE:
    import importlib.abc
    import importlib.machinery
    import sys

    class _Finder(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name not in _AFTER_IMPORT:
                return None
            spec = importlib.machinery.PathFinder.find_spec(name, path)
            if spec is None or spec.loader is None:
                return spec
            execute = spec.loader.exec_module

            def exec_module(module):
                execute(module)
                _AFTER_IMPORT[name](module)

            spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, _Finder())

if _LOSS:
    _KINDS = {int(k): v for k, v in (part.split(":") for part in _LOSS.split(","))}
    _PER_STEP = int(os.environ.get("SLM_TEST_SAMPLES_PER_STEP", "8"))
    if os.environ.get("SLM_TEST_LOSS_RANK", os.environ.get("RANK", "0")) != os.environ.get("RANK", "0"):
        _KINDS = {}
    _now = [None]

    def _patch_batches(module):
        step = module.Batches.step

        def batches_step(self, first_sample):
            _now[0] = first_sample // _PER_STEP
            return step(self, first_sample)

        module.Batches.step = batches_step

    def _patch_model(module):
        forward = module.Transformer.forward

        def poisoned_forward(self, *a, **kw):
            out = forward(self, *a, **kw)
            kind = _KINDS.get(_now[0]) if kw.get("targets") is not None and self.training else None
            if kind is None:
                return out
            return out[0] * (float("nan") if kind == "nan" else float(kind[1:])), out[1]

        module.Transformer.forward = poisoned_forward

    _AFTER_IMPORT["slm.train.batches"] = _patch_batches
    _AFTER_IMPORT["slm.model.transformer"] = _patch_model

if _WRITE_GATE:
    import threading
    import time as _time

    _WRITE_STEP = int(os.environ.get("SLM_TEST_WRITE_GATE_STEP", "0"))

    def _patch_checkpoint(module):
        write_json = module.write_json

        def gated_write_json(path, *a, **kw):
            p = str(path)
            if (threading.current_thread().name == "slm-checkpoint-writer" and p.endswith("/config.json")
                    and f"/step-{_WRITE_STEP:08d}.tmp-" in p):
                with open(f"{_WRITE_GATE}.writing-{os.getpid()}", "w"):
                    pass
                deadline = _time.monotonic() + 900
                while os.path.exists(_WRITE_GATE) and _time.monotonic() < deadline:
                    _time.sleep(0.02)
            return write_json(path, *a, **kw)

        module.write_json = gated_write_json

    _AFTER_IMPORT["slm.formats.checkpoint"] = _patch_checkpoint

if _GATE:
    import signal
    import time

    _STEP = int(os.environ.get("SLM_TEST_GATE_STEP", "0"))
    _TARGET = "slm.formats.metrics"
    _held = []

    def _mark(kind: str) -> None:
        with open(f"{_GATE}.{kind}-{os.getpid()}", "w"):
            pass

    def _note_signals() -> None:
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            previous = signal.getsignal(sig)
            if callable(previous):
                def handler(signum, frame, previous=previous):
                    _mark("signal")
                    previous(signum, frame)

                signal.signal(sig, handler)

    def _hold() -> None:
        _held.append(True)
        _note_signals()
        _mark("reached")
        deadline = time.monotonic() + 900  # never hang a test run for ever
        while os.path.exists(_GATE) and time.monotonic() < deadline:
            time.sleep(0.02)

    def _patch(module) -> None:
        write = module.MetricsLog.write

        def gated_write(self, record):
            write(self, record)
            if not _held and "valid_loss" not in record and record.get("step", -1) >= _STEP:
                _hold()

        module.MetricsLog.write = gated_write

    _AFTER_IMPORT[_TARGET] = _patch

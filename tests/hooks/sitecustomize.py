"""A test hook: hold a training process at a step until the test lets it go.

Tests that signal or kill a run while it trains must not race the machine's speed (a fast CPU finishes a 300-step
run before a poll sees it running). A test puts this directory first on PYTHONPATH and sets:

    SLM_TEST_GATE=PATH         the gate: while the file PATH exists, a process that reached the step waits
    SLM_TEST_GATE_STEP=K       the step (0-based, as metrics.jsonl numbers them) after whose record a process waits

When a process reaches the step it writes PATH.reached-PID, then waits while PATH exists. A SIGTERM, SIGUSR1 or
SIGINT that reaches it after that point writes PATH.signal-PID before slm's own handler runs, so a test can let the
run go on only once the signal has arrived. Without SLM_TEST_GATE this file does nothing. It never ships: it lives
under tests/ and only a test's environment names it.
"""

import os

_GATE = os.environ.get("SLM_TEST_GATE")

if _GATE:
    import importlib.abc
    import importlib.machinery
    import signal
    import sys
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

    class _Finder(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name != _TARGET:
                return None
            spec = importlib.machinery.PathFinder.find_spec(name, path)
            if spec is None or spec.loader is None:
                return spec
            execute = spec.loader.exec_module

            def exec_module(module):
                execute(module)
                _patch(module)

            spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, _Finder())

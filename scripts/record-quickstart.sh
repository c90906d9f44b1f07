#!/usr/bin/env bash
# Record a quickstart run for the README: docs/quickstart-run.md gets the run's report (`slm report`) with the date,
# the machine and the commit it ran. The README quotes its numbers between <!-- recorded --> marks, and
# tests/test_examples.py keeps every quote equal to this file: re-record after a change that moves them.
#
#   bash scripts/record-quickstart.sh [OUT_DIR]   (runs examples/quickstart.sh into OUT_DIR unless it holds a
#                                                  finished run, report.md; SLM_RECORD_COMMIT names the
#                                                  commit that made it, when that was earlier)
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
out=${1:-quickstart-out}
[ -f "$out/report.md" ] || bash "$root/examples/quickstart.sh" "$out"
python=${SLM_VENV:-$root/.venv}/bin/python
commit=$(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown)
git -C "$root" diff --quiet HEAD -- slm examples 2>/dev/null || commit="$commit with uncommitted changes"
commit=${SLM_RECORD_COMMIT:-$commit}   # the commit that made OUT_DIR, when it was made earlier
"$python" - "$out" "$root/docs/quickstart-run.md" "$commit" <<'EOF'
import datetime, json, os, platform, sys
from pathlib import Path

import torch

import slm

out, dest, commit = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
cpu, flags = platform.processor() or platform.machine(), ""
for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
    if line.startswith("model name") and cpu == (platform.processor() or platform.machine()):
        cpu = line.split(":", 1)[1].strip()
    if line.startswith("flags") and not flags:
        flags = line
bf16 = "with avx512_bf16" if "avx512_bf16" in flags.split() else "without avx512_bf16 (AVX2)" if "avx2" in flags else ""
cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
report = (out / "report.md").read_text().split("\n", 1)[1].lstrip("\n")
when = datetime.datetime.fromtimestamp((out / "report.md").stat().st_mtime, datetime.timezone.utc)
corpus = json.loads((out / "corpus" / "manifest.json").read_text())
began = datetime.datetime.fromisoformat(corpus["created_utc"]) - datetime.timedelta(seconds=corpus["wall_seconds"] or 0)
minutes = (when - began).total_seconds() / 60
dest.parent.mkdir(parents=True, exist_ok=True)
tmp = dest.with_suffix(".tmp")
tmp.write_text(
    "# A recorded quickstart run\n\n"
    f"`bash examples/quickstart.sh`, finished {when:%Y-%m-%d %H:%M} UTC after {minutes:.0f} minutes, recorded by "
    f"`scripts/record-quickstart.sh`: slm {slm.__version__} at commit {commit}; {cpu}, {cores} cores {bf16}; "
    f"Python {platform.python_version()}, torch {torch.__version__}.\n\n"
    "The README quotes its numbers (tests/test_examples.py keeps the quotes equal to this file). Another machine "
    "gives other numbers: the tiny models are small enough for float rounding and thread counts to move them.\n\n"
    + report)
tmp.replace(dest)
print(dest)
EOF

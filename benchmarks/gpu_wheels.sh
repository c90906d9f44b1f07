#!/usr/bin/env bash
# Download, here (where pip reaches a registry), the wheels that benchmarks/gpu.sh installs on a GPU machine that
# cannot reach one: slm's pure-Python needs that such a machine's image lacks or holds at another version.
#
#   bash benchmarks/gpu_wheels.sh [PYTHON_VERSION]     (default 3.12: the lent machines' python3, KINDS.md)
#
# Writes .whl/ at the repository's root (ignored by git). gpu.sh installs every wheel there into a temporary
# folder, without the network and without touching the machine's own packages, and puts it on PYTHONPATH.
# What the check imports was found by running `SLM_GPU_CHECK=cpu bash benchmarks/gpu.sh` in a virtual environment
# holding only the packages that the image lists: it needs typer at slm's pinned minor (slm's command line, which
# the resume test runs) and typer's own needs that the image does not list. torch, numpy, rich, pyyaml,
# safetensors, tokenizers, tiktoken, transformers and pytest come from the image.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
version=${1:-3.12}
dest="$root/.whl"
rm -rf "$dest"
mkdir -p "$dest"
py=$(command -v python3)
[ -x "$root/.venv/bin/python" ] && py="$root/.venv/bin/python"
platforms=()
for n in 28 27 17; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
platforms+=(--platform manylinux2014_x86_64)
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version "$version" --implementation cp \
  "${platforms[@]}" -d "$dest" \
  "typer>=0.29,<0.30" "pydantic>=2.5.3,<3" "pydantic-core" "annotated-types>=0.6" "typing-inspection>=0.4" \
  "annotated-doc>=0.0.2" 2>&1 | grep -v "is ignored: it is neither" >&2 || true
# pydantic pins pydantic-core exactly: download the version this pydantic names
want=$(unzip -p "$dest"/pydantic-[0-9]*.whl '*/METADATA' | sed -n 's/^Requires-Dist: pydantic-core==\([^ ;]*\).*/\1/p')
if [ -n "$want" ] && ! ls "$dest"/pydantic_core-"$want"-*.whl >/dev/null 2>&1; then
  rm -f "$dest"/pydantic_core-*.whl
  "$py" -m pip download -q --no-deps --only-binary=:all: --python-version "$version" --implementation cp \
    "${platforms[@]}" -d "$dest" "pydantic-core==$want" 2>&1 | grep -v "is ignored: it is neither" >&2 || true
fi
n=$(ls "$dest"/*.whl | wc -l)
[ "$n" -ge 6 ] || { echo "gpu_wheels.sh: expected 6 wheels in $dest, got $n" >&2; exit 1; }
echo "gpu_wheels.sh: $n wheels for Python $version in $dest ($(du -sh "$dest" | cut -f1)); carry .whl to the GPU machine" >&2
echo "$dest"

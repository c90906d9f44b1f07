#!/usr/bin/env bash
# Install a one-node SLURM for the test that submits examples/slurm/pretrain.sbatch (Debian's packages; the test
# starts and stops its own slurmctld and slurmd with a configuration under a temporary directory). CI calls this;
# where it cannot install (not root, no apt), the SLURM test skips and says why.
set -euo pipefail
if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null; then
  exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
  echo "install-slurm: needs root and apt-get; the SLURM test will skip" >&2
  exit 1
fi
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client >/dev/null

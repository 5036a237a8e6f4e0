#!/usr/bin/env bash
# Installs what tests/slurm needs: Debian's slurmctld, slurmd, slurm-client and munge (a one-node SLURM on
# loopback, started by scripts/local_slurm.sh). Called by .ci/run; does nothing when they are already there.
# Needs root and apt-get; elsewhere it says so and leaves it to the tests to skip with that reason.
set -euo pipefail

tools=(slurmctld slurmd sbatch munged mungekey)
missing() { for tool in "${tools[@]}"; do command -v "$tool" > /dev/null || return 0; done; return 1; }

if ! missing; then
    echo "install_slurm: SLURM and munge already installed"
    exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get > /dev/null; then
    echo "install_slurm: not root or no apt-get: cannot install SLURM; tests/slurm will be skipped" >&2
    exit 0
fi

# The packages' own system services stay stopped: the tests start private daemons with their own config.
policy=/usr/sbin/policy-rc.d
added_policy=false
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod +x "$policy" && added_policy=true
fi
trap '$added_policy && rm -f "$policy"' EXIT

export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends slurmctld slurmd slurm-client munge
if missing; then
    echo "install_slurm: the packages installed but ${tools[*]} are not all on PATH" >&2
    exit 1
fi
echo "install_slurm: $(sbatch --version) installed"

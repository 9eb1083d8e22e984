#!/usr/bin/env bash
# On the GPU machine (no network; Python 3.12 and torch there): bash rollouts/devicecheck.sh PREP OUT [run options]
# PREP is what `dp-devicecheck prepare` wrote here (wheels/, obs.npz); the tables go to OUT.
set -euo pipefail
prep=$(realpath "${1:?the folder dp-devicecheck prepare wrote}")
out=$(realpath -m "${2:?the folder for the tables}")
shift 2
venv=${TMPDIR:-/tmp}/dp-devicecheck-venv
python3 -m venv --system-site-packages "$venv"  # the machine's own torch, numpy, matplotlib
"$venv/bin/pip" install --quiet --disable-pip-version-check --no-index --find-links "$prep/wheels" \
  diffusers==0.42.1 hydra-core==1.3.8 omegaconf==2.3.1
cd "$(dirname "$0")/.."
"$venv/bin/python" -m rollouts.devicecheck run --data "$prep/obs.npz" --out "$out" "$@"

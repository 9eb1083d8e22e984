#!/usr/bin/env bash
# On the GPU machine (no network; Python 3.12 and torch there): bash rollouts/devicecheck.sh PREP OUT [run options]
# PREP is what `dp-devicecheck prepare` wrote here (wheels/, obs.npz); the tables go to OUT.
set -euo pipefail
prep=$(realpath "${1:?the folder dp-devicecheck prepare wrote}")
out=$(realpath -m "${2:?the folder for the tables}")
shift 2
cd "$(dirname "$0")/.."
venv=${TMPDIR:-/tmp}/dp-devicecheck-venv
if python3 -m venv --system-site-packages "$venv" 2>/dev/null; then  # over the machine's own torch, numpy, matplotlib
  py="$venv/bin/python"
  "$py" -m pip install --quiet --disable-pip-version-check --no-index --find-links "$prep/wheels" \
    diffusers==0.42.1 hydra-core==1.3.8 omegaconf==2.3.1
else  # no ensurepip: the wheels unpacked beside the machine's packages
  py=python3
  site=${TMPDIR:-/tmp}/dp-devicecheck-site
  python3 -m pip install --quiet --disable-pip-version-check --no-index --no-deps --target "$site" "$prep"/wheels/*.whl
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
"$py" -m rollouts.devicecheck run --data "$prep/obs.npz" --out "$out" "$@"

#!/usr/bin/env bash
# From a checkout on a bare GPU machine to the first-contact report, without the network.
#
#   bash benchmarks/first_contact.sh [--budget-s 420] [more `python -m flashcontrast.bench` flags]
#
# Needs what the GPU machines already have: python3 with torch and triton, setuptools,
# pybind11, cmake, ninja and nvcc. Nothing is installed or fetched: the package runs from
# python/ (PYTHONPATH), and the report's step (b) builds flashcontrast._C in place for this
# GPU's arch only (sm_90a on Hopper) with every core. Optional baselines travel as wheels
# in .whl/ (see README "First contact with a GPU"): open-clip-torch (its loss module only)
# and inf-cl; they are unpacked into a throw-away folder and put on the path.
# Results: $OUT when set (a lent machine's hand-back folder), else
# benchmarks/results/<device>/.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/python${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
if compgen -G ".whl/*.whl" >/dev/null; then
  site="$(mktemp -d)"
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:$site"
fi
out=()
if [ -n "${OUT:-}" ]; then out=(--out "$OUT"); fi
exec python3 -m flashcontrast.bench --gpu-report "${out[@]}" "$@"

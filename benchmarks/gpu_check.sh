#!/usr/bin/env bash
# The GPU check of issue 7: resnet56 -> resnet20 proxy trials on CIFAR-shaped data with and
# without the teacher-output cache, bf16 autocast and channels_last (benchmarks/gpu_check.py).
#
#   bash benchmarks/gpu_check.sh                 # on a GPU machine, no network: < 8 min
#   bash benchmarks/gpu_check.sh --cpu --quick   # the same logic on the CPU, to test it
#   bash benchmarks/gpu_check.sh --packing       # issue 13 instead: proxy trials per hour by workers
#                                                # per GPU and CUDA graphs (benchmarks/gpu_packing.py), < 8 min
#   bash benchmarks/gpu_check.sh --side-by-side  # issue 13: K proxy students in one vmapped model against K
#                                                # sequential trials (benchmarks/side_by_side.py), about 2 min
#
# Needs no network. Python: $PYTHON if set, else the repository's .venv if it runs, else
# python3. If a folder .whl holds wheels (e.g. optuna for a machine without it), they are
# installed with `pip install --no-index --no-deps` into a temporary folder first (if they do
# not install with this Python, a warning says so and the installed packages are used);
# otherwise what is installed is used (the check itself needs only torch, torchvision and numpy).
# Extra arguments go to gpu_check.py; the run is stopped after $GPU_CHECK_TIMEOUT s (470).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -n "${PYTHON:-}" ]; then
  py="$PYTHON"
elif [ -x .venv/bin/python ] && .venv/bin/python -c "import torch" 2>/dev/null; then
  py=.venv/bin/python
else
  py=python3
fi

site_dir=""
if compgen -G ".whl/*.whl" > /dev/null; then
  site_dir="$(mktemp -d "${TMPDIR:-/tmp}/kd_optuna_site.XXXXXX")"
  trap 'rm -rf "$site_dir"' EXIT
  if "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site_dir" .whl/*.whl; then
    echo "installed $(ls .whl/*.whl | wc -l) wheel(s) from .whl into $site_dir"
  else
    # wheels built for another Python or platform (e.g. carried for the GPU machine): use what is installed
    echo "gpu_check: the wheels in .whl do not install with $py; using the installed packages" >&2
    rm -rf "$site_dir"
    site_dir=""
  fi
fi
export PYTHONPATH="$PWD${site_dir:+:$site_dir}${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

if command -v nvidia-smi > /dev/null; then
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
fi
if ! "$py" -c "import torch, torchvision, numpy, kd_optuna.task" 2>/tmp/kd_gpu_check_import.$$; then
  echo "gpu_check: cannot import what the check needs with $py:" >&2
  tail -n 1 /tmp/kd_gpu_check_import.$$ >&2
  rm -f /tmp/kd_gpu_check_import.$$
  echo "put the missing packages' wheels in .whl/ (see the header of this script)" >&2
  exit 2
fi
rm -f /tmp/kd_gpu_check_import.$$
script=benchmarks/gpu_check.py
case "${1:-}" in
  --packing) script=benchmarks/gpu_packing.py; shift ;;
  --side-by-side) script=benchmarks/side_by_side.py; shift ;;
esac
exec timeout "${GPU_CHECK_TIMEOUT:-470}" "$py" "$script" "$@"

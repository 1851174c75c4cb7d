#!/usr/bin/env bash
# Wheels of what kd-optuna needs besides torch, torchvision and numpy, for a GPU machine without
# network (the lent device machines have torch but not optuna): put them in .whl/, carry .whl with
# the run, and benchmarks/gpu_check.sh installs them into a temporary folder before its check.
#
#   bash benchmarks/device_wheels.sh [PYTHON_VERSION]    # default 3.12, the device's Python
set -euo pipefail
cd "$(dirname "$0")/.."
version="${1:-3.12}"
py="${PYTHON:-.venv/bin/python}"
rm -rf .whl
"$py" -m pip download -q --only-binary=:all: --python-version "$version" \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
  -d .whl optuna optuna-dashboard plotly sqlalchemy alembic colorlog mako pyyaml tqdm click einops \
  "typing_extensions>=4.6" greenlet
rm -f .whl/numpy-*.whl  # the device's numpy is the one its torch was built with
echo "$(ls .whl | wc -l) wheels, $(du -sh .whl | cut -f1) in .whl/"

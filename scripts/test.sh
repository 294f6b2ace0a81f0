#!/usr/bin/env bash
# Set up a virtual environment in .venv and run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."

python3 -m venv .venv
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
# the CPU build of torch first: an open-ended torch requirement would pull a CUDA build
python -m pip install --quiet torch==2.13.0
python -m pip install --quiet -e ".[train,test,plot]"

python -m pytest -q "$@"

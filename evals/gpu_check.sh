#!/usr/bin/env bash
# The GPU check in one command (evals/gpu_check.py; arguments pass through, results go to $OUT if set).
cd "$(dirname "$0")/.." && exec "${PYTHON:-python3}" evals/gpu_check.py "$@"

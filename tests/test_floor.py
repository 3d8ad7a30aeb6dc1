"""evals/floor.py --tiny: the floors and every default method's split come out, and the split adds up."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["sparsegpt-50", "gptq-w4g64-actorder", "wanda-50"]


def test_floor_tiny_splits_every_method(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    out = tmp_path / "floor.md"
    done = subprocess.run([sys.executable, "evals/floor.py", "--tiny", "--out", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.with_suffix(".json").read_text())

    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in out.read_text().splitlines()
            if line.startswith("| ") and not line.startswith("| run ")]
    assert [(r[0], r[1]) for r in rows] == [("forward floor", "float32"), ("forward floor", "bfloat16"),
                                            *((m, "float32") for m in METHODS)]

    assert list(result["floor"]) == ["float32", "bfloat16"]
    for floor in result["floor"].values():
        assert floor["seconds"] > 0 and len(floor["block_seconds"]) == 2  # the tiny Llama's blocks
        assert floor["seconds"] == pytest.approx(sum(floor["block_seconds"]) + floor["capture_seconds"])
    assert list(result["methods"]) == METHODS
    for name, r in result["methods"].items():
        parts = [r["forward_seconds"], r["statistics_seconds"], r["update_seconds"]]
        assert all(p > 0 for p in parts), (name, parts)
        assert sum(parts) <= r["total_seconds"] * (1 + 1e-9), (name, parts, r["total_seconds"])
        assert r["linear_steps"] == 14  # 7 Linears in each of the 2 blocks, each compressed once
        # one XᵀX (or Σx²) update per shared input (q/k/v, o, gate/up, down) and batch (8 windows, 4 a batch)
        assert r["statistics_calls"] == 2 * 4 * 2
        floor = result["floor"]["float32"]["seconds"]
        assert abs(r["x_floor"]["update"] - r["update_seconds"] / floor) < 1e-9

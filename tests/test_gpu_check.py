"""evals/gpu_check.py in its CPU mode (--tiny, TRITON_INTERPRET=1): every step runs, so the GPU check cannot rot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
KERNELS = ["W4 g128", "W8 per channel", "2:4 fp16", "FP8 W8A8 (Triton)", "FP8 W8A8 + act quant (Triton)",
           "NVFP4 W4A16 (Triton)", "MXFP4 W4A16 (Triton)"]
BENCH_ROWS = ["fp16 (cuBLAS)", "W4 g128", "W8 per channel", "2:4 fp16", "bf16 (cuBLAS)", "FP8 torch._scaled_mm",
              "FP8 W8A8 (Triton)", "FP8 W8A8 + act quant (Triton)", "NVFP4 W4A16 (Triton)", "MXFP4 W4A16 (Triton)"]


def test_gpu_check_tiny_runs_every_step(tmp_path):
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "evals/gpu_check.py", "--tiny", "--out", str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert result["errors"] == {} and result["env"]["mode"] == "tiny"
    assert "mean nothing" in (tmp_path / "gpu_check.md").read_text()

    assert list(result["kernels"]) == KERNELS
    assert all(r["passed"] is True and r["max_err_over_bound"] <= 1 for r in result["kernels"].values())

    bench = result["bench"]
    assert bench["skipped"] == [] and bench["errors"] == []
    assert len(bench["shapes"]) == 4 and len(bench["ms"]) == 3
    for N, K in bench["shapes"]:
        for M in bench["ms"]:
            rows = {r["kernel"]: r for r in bench["rows"] if (r["N"], r["K"], r["M"]) == (N, K, M)}
            assert list(rows) == BENCH_ROWS, (N, K, M)
            assert all(r["ms"] > 0 for name, r in rows.items() if "(Triton)" in name or name[:2] in ("W4", "W8", "2:"))

    compressed = result["compress"]
    for name, blocks in (("gptq-w4g128", 2), ("sparsegpt-50", 2)):
        r = compressed[name]
        assert [b["block"] for b in r["blocks"]] == list(range(blocks))
        assert all(b["seconds"] > 0 and b["solve_seconds"] > 0 and b["linears"] == 7 for b in r["blocks"])
    assert compressed["gptq-w4g128"]["quantized_linears"] == 14
    assert compressed["sparsegpt-50"]["sparsity"] == pytest.approx(0.5, abs=0.01)

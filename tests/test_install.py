"""The repo root never shadows an installed package: our top-level `kernels/` is reached only as
`compress.kernels`, and Python started in the repo root (where `python -m` and `python -c` put the
working directory first on sys.path) still imports Hugging Face's `kernels`, which transformers needs."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def in_root(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)  # exactly what a user's shell gives
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_kernels_folder_is_not_a_regular_package():
    # A folder without __init__.py is a namespace portion: it never wins over a regular package (PEP 420).
    assert (ROOT / "kernels" / "dispatch.py").is_file()
    assert not (ROOT / "kernels" / "__init__.py").exists()


def test_transformers_imports_from_the_repo_root():
    proc = in_root("-c", "from transformers import LlamaConfig, AutoModelForCausalLM; print('ok')")
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


@pytest.mark.skipif(importlib.util.find_spec("kernels") is None
                    or "site-packages" not in str(importlib.util.find_spec("kernels").origin),
                    reason="Hugging Face's kernels package is not installed")
def test_import_kernels_from_the_repo_root_gives_hugging_faces_package():
    proc = in_root("-c", "import kernels; print(kernels.__file__)")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "site-packages" in proc.stdout and not proc.stdout.strip().startswith(str(ROOT / "kernels"))


def test_python_dash_m_compress_help_from_the_repo_root():
    proc = in_root("-m", "compress", "--help")
    assert proc.returncode == 0 and "usage: compress" in proc.stdout, proc.stderr[-2000:]


@pytest.mark.parametrize("cwd", ["root", "elsewhere"])
def test_compress_kernels_imports_from_any_working_directory(cwd, tmp_path):
    code = "import compress.kernels.dispatch as d, compress.kernels.reference as r; print(d.__name__, r.__name__)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT if cwd == "root" else tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["compress.kernels.dispatch", "compress.kernels.reference"]


def test_python_dash_m_pytest_on_a_model_building_file_from_the_repo_root():
    proc = in_root("-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_model.py", timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "error" not in proc.stdout.lower()

"""Saving and loading compressed models. Output folders are complete or absent."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from .model import load_model
from .recipe import Recipe, dump_recipe


def check_output_dir(out_dir: str | Path, overwrite: bool = False) -> Path:
    """Refuse a non-empty output folder unless overwrite; refuse a path that is a file."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"--out {out} is not empty (pass --overwrite to replace it)")
    return out


def save(model, tokenizer, out_dir: str | Path, *, recipe: Recipe | None = None,
         report: dict | None = None, overwrite: bool = False) -> Path:
    """Write model (safetensors), tokenizer, recipe.yaml and report.json into out_dir.

    Everything is written to a temporary sibling folder first and renamed into place at the end,
    so an interrupted save leaves no folder that looks complete. The model loads with stock
    `AutoModelForCausalLM.from_pretrained(out_dir)`.
    """
    out = check_output_dir(out_dir, overwrite).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if recipe is not None:
            (tmp / "recipe.yaml").write_text(dump_recipe(recipe))
        if report is not None:
            (tmp / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        if out.exists():
            trash = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(trash)
            tmp.rename(out)
            shutil.rmtree(trash)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def load(path: str | Path, dtype="float32"):
    """Load a model saved by `save` (or any supported HF model): (model, tokenizer)."""
    return load_model(path, dtype)

"""Output folders: complete or absent, and never over the input. Checked before any work starts
(check_output_dir); written into a temporary sibling that replaces the target in one rename at the
end (atomic_folder), or into a fixed partial folder a streamed run can resume from."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def check_output_dir(out_dir: str | Path, overwrite: bool = False, model: str | Path | None = None) -> Path:
    """Refuse a non-empty output folder unless overwrite; refuse a path that is a file, one that
    overlaps the input model (even with overwrite: the input is never replaced) and one whose
    parent cannot be written. Missing parents are fine: they are created at the end."""
    out = Path(out_dir)
    if model is not None:
        _check_apart(out, Path(model))
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"--out {out} is not empty (pass --overwrite to replace it)")
    parent = out.resolve().parent
    while not parent.exists():  # the folders that will be created; the first existing one must take them
        parent = parent.parent
    if not parent.is_dir():
        raise NotADirectoryError(f"--out {out} cannot be written: {parent} is a file, not a folder")
    # the output is made in a temporary sibling and renamed into place: both need write and search rights
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"--out {out} cannot be written: no write permission in {parent}")
    return out


def _check_apart(out: Path, model: Path) -> None:
    """Refuse an output that is, holds or sits inside the input model (a folder, or a .gguf file:
    writing there with --overwrite would replace the model). A hub id is not on disk: nothing to check."""
    if not model.exists():
        return
    out_r, model_r = out.resolve(), model.resolve()
    where = ("is" if out_r == model_r else "contains" if out_r in model_r.parents
             else "is inside" if model_r in out_r.parents else None)
    if where:
        raise ValueError(f"--out {out} {where} the model {model}; the input is never replaced: "
                         "write the output elsewhere")


def partial_folder(out_dir: str | Path) -> Path:
    """The fixed temporary sibling a resumable run writes into: `.{name}.partial`."""
    out = Path(out_dir).resolve()
    return out.with_name(f".{out.name}.partial")


@contextmanager
def atomic_folder(out_dir: str | Path, overwrite: bool = False, *, resumable: bool = False) -> Iterator[Path]:
    """A temporary sibling folder to write into; on success it replaces `out_dir` in one rename,
    on any failure it is removed, so `out_dir` is complete or as it was.

    With `resumable`, the folder is `partial_folder(out_dir)` (created if absent, kept as it is
    otherwise) and a failure leaves it in place for `--resume`; `out_dir` is untouched either way.
    """
    out = check_output_dir(out_dir, overwrite).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    if resumable:
        tmp = partial_folder(out)
        tmp.mkdir(exist_ok=True)
    else:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            trash = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(trash)
            tmp.rename(out)
            shutil.rmtree(trash)
        else:
            tmp.rename(out)
    except BaseException:
        if not resumable:
            shutil.rmtree(tmp, ignore_errors=True)
        raise

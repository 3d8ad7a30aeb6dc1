"""Bounded-memory, resumable runs (`compress run --stream`): one decoder block in memory at a time.

The model is built on the meta device (accelerate's `init_empty_weights`; buffers such as rotary
`inv_freq` stay real) and only its non-block tensors (embeddings, final norm, an untied head) are
read up front. apply.compress_ calls two hooks around each block: `load_block` reads the block's
tensors from the input's safetensors shards (`safe_open`), `finish_block` writes the compressed
block to its own output shard and releases it back to meta. Everything goes into the fixed
sibling folder `.{out}.partial`:

    model-00001-of-000NN.safetensors      block 0, compressed; block i -> shard i + 1
    activations-00003/00000.safetensors   the hidden states entering block 3, one file per batch
    progress.json                         next block, recipe, model fingerprint, report rows so far

Each file is written under a temporary name and renamed, shard and activations before
progress.json, so a run killed anywhere resumes (`--resume`) at its first unfinished block and
ends with the same files. At the end come the non-block tensors (the last shard), the index,
config.json (quantization_config / compression_config as saving.save writes them), generation
config, tokenizer, recipe.yaml and report.json; the activations and progress.json are removed
and the folder is renamed to `out` in one step, so `out` is complete or absent.

Memory: the non-block tensors, one block, its compression's working set (GPTQ's Hessians and
their inverses: 3 x in² x 4 bytes for the widest Linear) and the calibration hidden states. Inside
a block the samples run one batch at a time (calibrate.compress_block with low_memory: each
Linear's statistics from a forward that stops at it, about 2.5 forwards per block), so only one
batch's intermediates are alive. Between blocks the hidden states stay in memory up to the
activation budget; above it they are dropped once written to the partial folder and read back
(all of them) when the next block starts, so the budget bounds them while blocks are read and
written, not inside a block.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import os
import re
import shutil
import signal
from pathlib import Path

import torch
from torch import Tensor, nn

from .layers import CompressedLinear, format_of
from .model import (
    DTYPES,
    blocks_path,
    check_supported,
    decoder_blocks,
    fp32_tensors,
    parameter_counts,
    set_module,
    source_dtype,
    unfuse_experts,
)
from .outdir import atomic_folder, partial_folder
from .phases import check_streamable
from .recipe import Recipe, dump_recipe
from .saving import add_compression_config, cast_floats, checkpoint_tensors, store_sparse_, write_extras

log = logging.getLogger(__name__)

PROGRESS = "progress.json"
LAYOUT_VERSION = 2  # of progress.json's layout records (2: CompressedLinear.layout()); a run resumes only its own


def tensor_files(folder: Path) -> dict[str, Path]:
    """Checkpoint tensor name -> the safetensors file holding it, from the index or the one file."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: folder / file for name, file in weight_map.items()}
    single = folder / "model.safetensors"
    if single.is_file():
        from safetensors import safe_open

        with safe_open(single, "pt") as f:
            return dict.fromkeys(f.keys(), single)
    raise ValueError(f"--stream reads safetensors shards and {folder} has none (model.safetensors or its index); "
                     f"convert it first: compress convert {folder} --out DIR")


def input_folder(path: str | Path) -> Path:
    """The local Hugging Face folder --stream reads; a .gguf, a hub id or a .bin folder is refused."""
    p = Path(path)
    if not p.is_dir() or not (p / "config.json").is_file():
        raise ValueError(f"--stream needs a local Hugging Face folder with safetensors, got {path}; "
                         f"convert it first: compress convert {path} --out DIR")
    if "quantization_config" in json.loads((p / "config.json").read_text()):
        raise ValueError(f"{path} is already quantized; --stream reads plain checkpoints "
                         "(compress convert --dense gives one)")
    return p.resolve()


def open_skeleton(folder: Path, dtype: torch.dtype, *, trust_remote_code: bool = False):
    """(model with its decoder blocks on meta and every other tensor read, tokenizer,
    {model tensor name: (file, checkpoint name)} of the block tensors)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    check_supported(config.model_type)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    unfuse_experts(model)  # an MoE's blocks take the per-expert tensors of its checkpoint
    model.eval()
    if model.can_generate() and (folder / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(folder)
    expected = set(model.state_dict())
    ignore = [re.compile(p) for p in getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ()]
    places: dict[str, tuple[Path, str]] = {}
    for name, file in tensor_files(folder).items():
        own = name if name in expected else f"{model.base_model_prefix}.{name}"
        if own in expected:
            places[own] = (file, name)
        elif not any(p.search(name) for p in ignore):
            raise ValueError(f"{folder}: tensor {name} has no place in a {config.model_type} model; "
                             f"re-save it with: compress convert {folder} --out DIR")
    prefix = blocks_path(model) + "."
    rest = {k: v for k, v in places.items() if not k.startswith(prefix)}
    head = _tied_head(model)
    missing = expected - set(places) - {head}
    if missing:
        raise ValueError(f"{folder}: the checkpoint lacks {sorted(missing)[:3]}")
    model.load_state_dict(read_tensors(rest, dtype, fp32_tensors(model)), strict=False, assign=True)
    model.tie_weights()
    return model, AutoTokenizer.from_pretrained(folder), {k: v for k, v in places.items() if k.startswith(prefix)}


def _tied_head(model: nn.Module) -> str | None:
    """The output head's weight name when it is tied to the input embeddings (not in checkpoints)."""
    if not getattr(model.config, "tie_word_embeddings", False):
        return None
    head = model.get_output_embeddings()
    return next((f"{n}.weight" for n, m in model.named_modules() if m is head), None)


def read_tensors(places: dict[str, tuple[Path, str]], dtype: torch.dtype,
                 fp32: re.Pattern | None = None) -> dict[str, Tensor]:
    """Read the named tensors, one file open at a time; floating ones cast to `dtype`, those whose
    names `fp32` matches to float32 (model.fp32_tensors: as from_pretrained keeps them)."""
    from safetensors import safe_open

    out: dict[str, Tensor] = {}
    for file in sorted({f for f, _ in places.values()}):
        with safe_open(file, "pt") as f:
            for own, (g, name) in places.items():
                if g == file:
                    t = f.get_tensor(name)
                    keep = fp32 is not None and fp32.search(own)
                    out[own] = t.to(torch.float32 if keep else dtype) if t.is_floating_point() else t
    return out


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def _save(tensors: dict[str, Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    _write_atomic(path, lambda p: save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, p,
                                            metadata={"format": "pt"}))


def _header(file: Path) -> bytes:
    """A safetensors file's JSON header (names, dtypes, shapes, offsets); the data follows it."""
    with open(file, "rb") as f:
        return f.read(int.from_bytes(f.read(8), "little"))


def fingerprint(folder: Path) -> str:
    """sha256 of config.json and every safetensors header: cheap, and it changes when the model
    does, short of equal-shaped weights rewritten in place."""
    h = hashlib.sha256((folder / "config.json").read_bytes())
    for file in sorted(folder.glob("*.safetensors")):
        h.update(file.name.encode() + _header(file))
    return h.hexdigest()


def module_layout(block: nn.Module, prefix: str) -> dict[str, dict]:
    """What each Linear of a finished block became: a compressed Linear's layout() (its entry and
    shape), a plain one's shape. A resumed run rebuilds the finished blocks from it on meta, since the
    config and the report read them."""
    layout = {}
    for name, m in block.named_modules():
        if isinstance(m, CompressedLinear):
            layout[f"{prefix}.{name}"] = m.layout()
        elif isinstance(m, nn.Linear):
            layout[f"{prefix}.{name}"] = {"type": "linear", "in": m.in_features, "out": m.out_features,
                                          "bias": m.bias is not None}
    return layout


def restore_layout_(model: nn.Module, layout: dict[str, dict], dtype: torch.dtype) -> None:
    """Put modules as `module_layout` describes them into the model, on meta (parents before children)."""
    for fqn, e in layout.items():
        cls = format_of(e)
        new = cls.empty(e, dtype, "meta") if cls else nn.Linear(e["in"], e["out"], e["bias"], "meta", dtype)
        set_module(model, fqn, new)


class BlockStream:
    """What apply.compress_ calls around each decoder block in a streamed run: `load_block`
    before it, `finish_block` after it; `first` and `rows` say where a resumed run starts, and
    `dense_params` counts the input model's parameters."""

    def __init__(self, model: nn.Module, places: dict[str, tuple[Path, str]], folder: Path,
                 identity: dict, budget_bytes: int, progress: dict | None):
        self.model, self.places, self.folder, self.identity = model, places, folder, identity
        self.budget_bytes = budget_bytes
        self.n = len(decoder_blocks(model))
        self.first = progress["next"] if progress else 0
        self.rows = progress["rows"] if progress else []
        self.layout = progress["layout"] if progress else {}
        self.resumed = progress is not None
        self.spilled = False  # the hidden states of the last finished block are on disk only
        self.dtype = next(model.parameters()).dtype
        self.save_dtype = DTYPES[identity["save_dtype"]]  # of the tensors left unquantized, as `save` writes them
        self.dense_params = parameter_counts(model)  # before finished blocks are put back compressed
        restore_layout_(model, self.layout, self.dtype)

    def shard_name(self, index: int) -> str:
        return f"model-{index + 1:05d}-of-{self.n + 1:05d}.safetensors"

    def load_block(self, i: int, hidden: list[Tensor] | None) -> list[Tensor] | None:
        """Read block i's tensors into it; the hidden states entering it (`hidden`, or from disk
        when they were spilled or this run resumes here)."""
        prefix = f"{blocks_path(self.model)}.{i}."
        mine = {k: v for k, v in self.places.items() if k.startswith(prefix)}
        state = read_tensors(mine, self.dtype, fp32_tensors(self.model))
        decoder_blocks(self.model)[i].load_state_dict({k[len(prefix):]: v for k, v in state.items()},
                                                      strict=True, assign=True)
        resumed_here = self.resumed and i == self.first and i > 0  # block 0's inputs are captured anew
        if not (resumed_here and hidden is not None) and not (hidden is None and self.spilled):
            return hidden
        acts = self.folder / f"activations-{i:05d}"
        if not acts.is_dir():
            raise RuntimeError(f"{acts} is missing; run without --resume to start over")
        from safetensors.torch import load_file

        return [load_file(p)["hidden"] for p in sorted(acts.glob("*.safetensors"))]

    def finish_block(self, i: int, hidden: list[Tensor] | None, rows: list[dict]) -> list[Tensor] | None:
        """Write block i's shard, the next block's inputs and the progress; release the block.
        Returns the hidden states to keep in memory (None above the activation budget)."""
        block = decoder_blocks(self.model)[i]
        prefix = f"{blocks_path(self.model)}.{i}"
        self.folder.mkdir(parents=True, exist_ok=True)  # only now: failing before block 0 leaves nothing
        store_sparse_(block, self.identity["sparse_format"], self.save_dtype)  # as `save` does to every block
        _save(checkpoint_tensors(block, prefix, self.save_dtype, fp32_tensors(self.model)),
              self.folder / self.shard_name(i))
        self.layout.update(module_layout(block, prefix))
        if hidden is not None and i + 1 < self.n:
            acts = self.folder / f"activations-{i + 1:05d}"
            tmp = acts.with_name(acts.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            for j, h in enumerate(hidden):
                _save({"hidden": h}, tmp / f"{j:05d}.safetensors")
            shutil.rmtree(acts, ignore_errors=True)
            os.replace(tmp, acts)
        progress = {**self.identity, "next": i + 1, "rows": rows, "layout": self.layout}
        _write_atomic(self.folder / PROGRESS, lambda p: p.write_text(json.dumps(progress, indent=1) + "\n"))
        shutil.rmtree(self.folder / f"activations-{i:05d}", ignore_errors=True)
        # test hook: COMPRESS_TEST_KILL_AFTER_BLOCK=k has the process SIGKILL itself once block k is on
        # disk, so the kill-and-resume test starts from a known state rather than a timing race
        if os.environ.get("COMPRESS_TEST_KILL_AFTER_BLOCK") == str(i):
            os.kill(os.getpid(), signal.SIGKILL)
        block.to("meta")
        self.spilled = hidden is not None and sum(h.nbytes for h in hidden) > self.budget_bytes
        return None if self.spilled else hidden

    def finish(self, out: str | Path, tokenizer, recipe: Recipe, report: dict, overwrite: bool) -> Path:
        """Write the non-block tensors, the index, config and extras; move the folder to `out`."""
        from safetensors import safe_open
        from transformers.modeling_utils import remove_tied_weights_from_state_dict

        with atomic_folder(out, overwrite, resumable=True) as tmp:
            prefix = blocks_path(self.model) + "."
            rest = cast_floats({k: v for k, v in self.model.state_dict().items() if not k.startswith(prefix)},
                               self.save_dtype, fp32_tensors(self.model))
            _save(remove_tied_weights_from_state_dict(rest, self.model), tmp / self.shard_name(self.n))
            weight_map, total = {}, 0
            for b in range(self.n + 1):
                with safe_open(tmp / self.shard_name(b), "pt") as f:
                    weight_map.update(dict.fromkeys(f.keys(), self.shard_name(b)))
                total += (tmp / self.shard_name(b)).stat().st_size - 8 - len(_header(tmp / self.shard_name(b)))
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
            config = self.model.config
            config.dtype = str(self.save_dtype).split(".")[1]  # the unquantized tensors', as `save` records it
            config.architectures = [type(self.model).__name__]
            config.save_pretrained(tmp)
            if self.model.can_generate():
                self.model.generation_config.save_pretrained(tmp)
            add_compression_config(self.model, tmp)
            write_extras(tmp, tokenizer, recipe, report)
            for leftover in [*tmp.glob("activations-*"), *tmp.glob("*.tmp")]:  # a killed run's too
                shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
            (tmp / PROGRESS).unlink()
        return Path(out).resolve()


def _mmap_large_allocations() -> None:
    """Have glibc serve every allocation of 1 MiB or more by its own mmap, so that a freed tensor
    goes back to the OS at once. Otherwise freed tensors stay in a fragmented heap, and peak RSS
    grew about 300 MiB above the live tensors on a 2048-wide model (a no-op outside glibc)."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD (malloc.h), which also stops its growth
    except (OSError, AttributeError):
        pass


def open_stream(model_path: str | Path, recipe: Recipe, out: str | Path, *, dtype: str = "float32",
                activation_budget_mb: float = 1024, resume: bool = False, trust_remote_code: bool = False,
                save_dtype: str = "source", sparse_format: str = "dense"):
    """(model skeleton, tokenizer, BlockStream) for a streamed run into `out`'s partial folder.

    Without `resume` an old partial folder is removed; with it, the run goes on where the partial
    folder's progress.json says, after checking that the recipe, model and dtype are the same.
    """
    check_streamable(recipe)
    _mmap_large_allocations()
    if activation_budget_mb < 0:
        raise ValueError(f"--activation-budget-mb must be >= 0, got {activation_budget_mb}")
    folder = input_folder(model_path)
    model, tok, places = open_skeleton(folder, DTYPES[dtype], trust_remote_code=trust_remote_code)
    partial = partial_folder(out)
    if save_dtype == "source":  # as `save` does: the unquantized tensors keep the files' precision
        stored = source_dtype(sorted(set(tensor_files(folder).values())))
        save_dtype = str(stored or DTYPES[dtype]).removeprefix("torch.")
    identity = {"model": str(folder), "fingerprint": fingerprint(folder), "dtype": dtype, "save_dtype": save_dtype,
                "sparse_format": sparse_format, "recipe": dump_recipe(recipe), "layout_version": LAYOUT_VERSION}
    progress = None
    if resume and (partial / PROGRESS).is_file():
        progress = json.loads((partial / PROGRESS).read_text())
        for key, what in (("recipe", "recipe"), ("fingerprint", "model"), ("model", "model"), ("dtype", "--dtype"),
                          ("save_dtype", "--save-dtype"), ("sparse_format", "--sparse-format"),
                          ("layout_version", "version of compress")):
            if progress.get(key) != identity[key]:
                raise ValueError(f"cannot resume {partial}: it was started with another {what}; "
                                 "run without --resume to start over")
    else:
        if resume:
            log.warning("nothing to resume (no %s): starting from block 0", partial / PROGRESS)
        shutil.rmtree(partial, ignore_errors=True)
    budget = int(activation_budget_mb * 2**20)
    return model, tok, BlockStream(model, places, partial, identity, budget, progress)

"""Calibration and evaluation tokens: from a text file, a dataset name, or the model itself."""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from .config import Config, require

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Calib(Config):
    """Calibration data: a text file, a dataset name (wikitext2, c4) or "self" (sampled from the model)."""

    source: str = "c4"
    samples: int = 128
    seqlen: int = 512
    seed: int = 0
    batch_size: int = 4  # samples per forward in the streaming pass; 4 was fastest on a 2-core CPU
    score_samples: int = 32  # the first samples, read by the scoring passes that plan non-uniform budgets
    # dtype of the hidden states kept between decoder blocks; "model" keeps the model's own (exact).
    # float16 halves their memory (and the files --stream writes) at a rounding of every block's input
    activation_dtype: Literal["model", "float32", "float16", "bfloat16"] = "model"
    # MoE: every calibration token through every routed expert for its statistics (the block's output
    # stays the routed one); else an expert routed fewer tokens than min_expert_tokens takes all of them
    all_experts: bool = False
    min_expert_tokens: int = 0

    def validate(self) -> None:
        require(self.samples >= 1, f"calib.samples must be >= 1, got {self.samples}")
        require(self.score_samples >= 1, f"calib.score_samples must be >= 1, got {self.score_samples}")
        require(self.batch_size >= 1, f"calib.batch_size must be >= 1, got {self.batch_size}")
        require(self.seqlen >= 2, f"calib.seqlen must be >= 2, got {self.seqlen}")
        require(self.min_expert_tokens >= 0, f"calib.min_expert_tokens must be >= 0, got {self.min_expert_tokens}")

# name -> (datasets path, config, split, text column); joined with "\n\n" as the GPTQ protocol does
DATASETS = {
    "wikitext2": ("wikitext", "wikitext-2-raw-v1", {"calib": "train", "eval": "test"}, "text"),
    "c4": ("allenai/c4", "en", {"calib": "train", "eval": "validation"}, "text"),
}
C4_FILES = {"calib": "en/c4-train.00000-of-01024.json.gz", "eval": "en/c4-validation.00000-of-00008.json.gz"}


def check_source(source: str) -> None:
    """Fail early on a text source that cannot work: a missing or empty file, an unknown name."""
    path = Path(source)
    if path.is_file():
        if path.stat().st_size == 0 or not read_utf8(path).strip():
            raise ValueError(f"text file is empty: {source}")
    elif source not in DATASETS:
        raise FileNotFoundError(f"no such file, and not a dataset name: {source} (names: {', '.join(DATASETS)}, self)")


def read_utf8(path: Path) -> str:
    """A text file's contents; anything but UTF-8 (another encoding, a binary file) is refused, named
    with its first bad byte, rather than read as replacement characters the tokenizer would learn from."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text: invalid byte 0x{data[e.start]:02x} at offset {e.start}") from None


def load_text(source: str, purpose: str = "eval") -> str:
    """The text of a file path, or of a dataset name (wikitext2, c4) through `datasets` (online)."""
    check_source(source)
    if Path(source).is_file():
        return read_utf8(Path(source))
    return _dataset_text(source, purpose)


def _dataset_text(name: str, purpose: str) -> str:
    try:
        import datasets
    except ImportError:
        raise ValueError(f"dataset {name!r} needs the datasets package: pip install datasets") from None
    path, config, splits, column = DATASETS[name]
    kwargs = {"data_files": {splits[purpose]: C4_FILES[purpose]}} if name == "c4" else {"name": config}
    try:
        rows = datasets.load_dataset(path, split=splits[purpose], **kwargs)
    except Exception as e:  # datasets raises many types when offline; all mean "not available"
        raise FileNotFoundError(
            f"cannot load dataset {name!r} ({type(e).__name__}); offline, pass a text file instead"
        ) from None
    return "\n\n".join(rows[column])


def tokenize(tokenizer, text: str, chunk_chars: int = 1 << 20) -> Tensor:
    """Token ids [1, N] without special tokens (windows get their BOS at evaluation time).

    Long texts are encoded in pieces that end at a newline, which gives the same ids as one call
    for tokenizers whose encoding splits at newlines (checked first), at a small fraction of the
    memory: one call on 10 MB of text holds over 1 GB.
    """
    def encode(piece: str) -> list[int]:
        return tokenizer(piece, add_special_tokens=False, return_attention_mask=False).input_ids

    if len(text) <= chunk_chars or encode("one\ntwo\n three") != encode("one\n") + encode("two\n") + encode(" three"):
        return torch.tensor([encode(text)], dtype=torch.long)
    parts, start = [], 0
    while start < len(text):
        end = text.find("\n", start + chunk_chars)
        end = len(text) if end < 0 else end + 1
        parts.append(torch.tensor(encode(text[start:end]), dtype=torch.long))
        start = end
    return torch.cat(parts).unsqueeze(0)


def load_tokens(tokenizer, source: str, max_tokens: int | None = None) -> Tensor:
    """Evaluation tokens [1, N] from a file or dataset name, cut to max_tokens."""
    ids = tokenize(tokenizer, load_text(source, "eval"))
    return ids[:, :max_tokens] if max_tokens else ids


def calibration_batches(tokenizer, calib: Calib, model=None) -> list[Tensor]:
    """calib.samples windows [1, calib.seqlen], seeded.

    From text, windows start at random.Random(seed).randint(0, N − seqlen − 1) of the token stream
    (the sampling of the GPTQ/SparseGPT code). From "self", the model writes them itself.
    """
    if calib.source == "self":
        if model is None:
            raise ValueError("calib.source 'self' samples from the model, so it needs the model")
        return sample_from_model(model, tokenizer, calib)
    ids = tokenize(tokenizer, load_text(calib.source, "calib"))[0]
    if ids.numel() < calib.seqlen + 1:
        raise ValueError(
            f"calibration text {calib.source} has {ids.numel()} tokens; one sample needs "
            f"{calib.seqlen + 1} (lower calib.seqlen or give more text)"
        )
    rng = random.Random(calib.seed)
    starts = [rng.randint(0, ids.numel() - calib.seqlen - 1) for _ in range(calib.samples)]
    return [ids[s : s + calib.seqlen].unsqueeze(0).clone() for s in starts]


@torch.no_grad()
def sample_from_model(model, tokenizer, calib: Calib, batch_size: int = 16) -> list[Tensor]:
    """Text generated by the model itself, for when no calibration data is at hand.

    Each sample starts from the BOS token (or a seeded random token when there is none) and
    continues by sampling (top-k 50) for exactly seqlen − 1 tokens. Seeds torch's global RNG.
    """
    torch.manual_seed(calib.seed)
    device = next(model.parameters()).device
    new = calib.seqlen - 1
    out: list[Tensor] = []
    for b0 in range(0, calib.samples, batch_size):
        n = min(batch_size, calib.samples - b0)
        if tokenizer.bos_token_id is not None:
            start = torch.full((n, 1), tokenizer.bos_token_id)
        else:
            start = torch.randint(0, model.config.vocab_size, (n, 1))
        ids = model.generate(
            start.to(device), attention_mask=torch.ones_like(start).to(device), do_sample=True,
            top_k=50, max_new_tokens=new, min_new_tokens=new, pad_token_id=tokenizer.eos_token_id or 0,
        )
        out.extend(ids[i : i + 1, : calib.seqlen].cpu() for i in range(n))
    return out

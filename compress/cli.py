"""Command line: `compress run RECIPE --model M --out DIR`, `compress eval MODEL --data D`,
`compress convert MODEL --out DIR [--dense]`, `compress score MODEL --calib D`, `compress inspect DIR`.

The parser, the dispatch and the error handling; the commands' bodies are in run_command.py (run) and
commands.py (the others)."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
from pathlib import Path

from .commands import cmd_convert, cmd_eval, cmd_inspect, cmd_score
from .distributed import finish
from .run_command import cmd_run
from .saving import SPARSE_FORMATS

log = logging.getLogger("compress")


SAVE_DTYPES = ("source", "float32", "bfloat16", "float16")
SAVE_DTYPE_HELP = ("dtype of the tensors left unquantized (embeddings, norms, dense Linears); default 'source': "
                   "the precision of the input model's files (16-bit for a GGUF)")


SPARSE_FORMAT_HELP = ("how pruned Linears are stored: 'dense' (default; stock transformers loads it) or 'bitmask' "
                      "(compressed-tensors sparse-bitmask: nonzeros and one bit per weight, 0.56x at 50%% sparsity; "
                      "compress.load reads it, transformers 5 with compressed-tensors 0.20 cannot)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="compress", description="Compress LLMs with YAML recipes.")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="apply a recipe to a model and save the result")
    run.add_argument("recipe", help="YAML recipe file (see recipes/)")
    run.add_argument("--model", required=True, help="HF folder or id, or a .gguf file")
    run.add_argument("--out", required=True, help="output folder (must be empty or absent)")
    run.add_argument("--calib", help="calibration text file, dataset name (wikitext2, c4) or 'self'")
    run.add_argument("--calib-samples", type=int, help="number of calibration windows")
    run.add_argument("--calib-seqlen", type=int, help="tokens per calibration window")
    run.add_argument("--eval-data", help="evaluation text file or dataset name (enables perplexity)")
    run.add_argument("--eval-seqlen", type=int, help="tokens per evaluation window (default 2048)")
    run.add_argument("--eval-max-tokens", type=int, help="evaluate on the first N tokens only")
    run.add_argument("--no-dense-eval", action="store_true", help="skip the perplexity of the input model")
    run.add_argument("--eval-kl", action="store_true",
                     help="also report the KL divergence from the input model (mean, p99) and top-1 agreement")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a recipe value, e.g. steps.0.sparsity=0.6 (repeatable)")
    run.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    run.add_argument("--save-dtype", choices=SAVE_DTYPES, default="source", help=SAVE_DTYPE_HELP)
    run.add_argument("--sparse-format", choices=SPARSE_FORMATS, default="dense", help=SPARSE_FORMAT_HELP)
    run.add_argument("--stream", action="store_true",
                     help="bounded memory: read, compress and write one decoder block at a time (safetensors input)")
    run.add_argument("--resume", action="store_true",
                     help="with --stream: go on from the last finished block of an interrupted run into the same --out")
    run.add_argument("--activation-budget-mb", type=float, metavar="MB",
                     help="with --stream: keep hidden states between blocks in memory up to this size, "
                          "else read them back from disk (default 1024)")
    _model_flags(run)

    ev = sub.add_parser("eval", help="perplexity of a model on a text; with --reference, its KL divergence "
                        "from another model")
    ev.add_argument("model", help="HF folder or id, or a .gguf file")
    ev.add_argument("--data", required=True, help="text file or dataset name (wikitext2, c4)")
    ev.add_argument("--reference", metavar="DENSE",
                    help="model to compare with (e.g. the uncompressed one; same vocabulary): mean and p99 KL "
                         "divergence of the next-token distribution from it, top-1 agreement, both perplexities")
    ev.add_argument("--seqlen", type=int, default=2048)
    ev.add_argument("--max-tokens", type=int)
    ev.add_argument("--batch-size", type=int, default=1)
    ev.add_argument("--json", action="store_true",
                    help="print one JSON object: ppl, tokens, seqlen, seconds (with --reference: reference_ppl, kl)")
    _model_flags(ev)

    conv = sub.add_parser("convert", help="re-save a model (GGUF or HF in, HF checkpoint out)")
    conv.add_argument("model", help="a checkpoint folder written by compress or another tool, an HF id or a .gguf")
    conv.add_argument("--out", required=True, help="output folder (must be empty or absent)")
    conv.add_argument("--dense", action="store_true",
                      help="dequantize every compressed Linear: a plain checkpoint any HF runtime loads")
    conv.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    conv.add_argument("--save-dtype", choices=SAVE_DTYPES, default="source", help=SAVE_DTYPE_HELP)
    conv.add_argument("--sparse-format", choices=SPARSE_FORMATS,
                      help="store pruned Linears dense or sparse-bitmask (default: as the input has them)")
    _model_flags(conv)

    sc = sub.add_parser("score", help="layer-wise importance scores; with --validate, how well every score "
                        "predicts the measured loss increase")
    sc.add_argument("model", help="HF folder or id, or a .gguf file")
    sc.add_argument("--calib", required=True, help="text file or dataset name for the statistics and held-out loss")
    sc.add_argument("--samples", type=int, default=32, help="windows for the Fisher and activation statistics")
    sc.add_argument("--heldout", type=int, default=8, help="further windows on which losses are measured")
    sc.add_argument("--seqlen", type=int, default=256)
    sc.add_argument("--seed", type=int, default=0)
    sc.add_argument("--validate", action="store_true", help="measure the true loss increase of sampled units")
    sc.add_argument("--groups", type=int, default=24, help="column groups sampled for --validate")
    sc.add_argument("--quants", type=int, default=24, help="Linears quantized for --validate")
    sc.add_argument("--formats", type=int, default=8,
                    help="further Linears, each rounded onto every float format (nvfp4, mxfp4, fp8, bf16), for "
                         "--validate; 0: none")
    sc.add_argument("--out", help="folder for the table (.md, .json) and, with --validate, the plot (.png)")
    sc.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    _model_flags(sc)

    ins = sub.add_parser("inspect", help="per-module table of a checkpoint: type, bits, group, sparsity, bytes")
    ins.add_argument("model", help="checkpoint folder")
    ins.add_argument("--json", action="store_true", help="print the rows as JSON")
    for parser in (p, *sub.choices.values()):
        _global_flags(parser)
    return p


def _global_flags(p: argparse.ArgumentParser) -> None:
    """-v and --quiet, before or after the subcommand. No defaults (SUPPRESS): the subcommand's
    parser would otherwise reset a flag given before it to False; main fills in the absent ones."""
    p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                   help="log one line per compressed layer")
    p.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress bars")


def _model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--device", default=None, help="compute device for the blocks (default: where the model is)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow model code from the model folder")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.verbose, args.quiet = getattr(args, "verbose", False), getattr(args, "quiet", False)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    if args.quiet or getattr(args, "json", False):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    try:
        commands = {"run": cmd_run, "eval": cmd_eval, "convert": cmd_convert, "inspect": cmd_inspect,
                    "score": cmd_score}
        code = commands[args.command](args)
        sys.stdout.flush()  # here, so that a reader gone away (`| head`) is caught below, not at exit
        return code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # stdout's reader has closed it: stop quietly, as tools killed by SIGPIPE do (128 + 13). What is
        # left in the buffer goes to devnull, else the flush at exit fails again, with a message.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except (ValueError, OSError, RuntimeError) as e:
        if log.isEnabledFor(logging.DEBUG):
            raise
        print(f"error: {_message(e, args)}", file=sys.stderr)
        return 2
    finally:
        finish()  # the process group that torchrun's ranks started, if any


def _message(e: BaseException, args) -> str:
    out = getattr(args, "out", None)
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:  # outputs go to a temporary folder, removed on failure
        where = out or e.filename or "the output"
        kept = "as it was" if out and Path(out).exists() else "not created"
        return f"no space left on device while writing {where} (nothing was written: {where} is {kept})"
    return _one_line(e)


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) < 400 else text[:397] + "..."

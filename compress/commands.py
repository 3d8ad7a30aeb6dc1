"""The bodies of the command-line commands other than `run` (run_command.py; cli.py parses the
arguments and reports errors): `eval` (perplexity, KL divergence from a reference), `score` (per-layer
importance scores and their validation), `convert` (re-save, --dense for plain Linears) and `inspect`
(a checkpoint's per-module table)."""

from __future__ import annotations

import json
import sys
import time

import torch

from .fpquant import FORMATS as FLOAT_FORMATS
from .run_command import _check_windows_fit, _eval_window, _save_dtype


def cmd_eval(args) -> int:
    from .data import load_tokens
    from .evaluate import adds_bos, eval_windows, kl_divergence, perplexity
    from .loading import load

    if args.seqlen < 2 or args.batch_size < 1 or (args.max_tokens is not None and args.max_tokens < 2):
        raise ValueError("--seqlen and --max-tokens must be >= 2 and --batch-size >= 1")
    model, tok = load(args.model, args.dtype, trust_remote_code=args.trust_remote_code)
    reference = _load_reference(args, model) if args.reference else None
    if args.device:
        model.to(args.device)
        if reference is not None:
            reference.to(args.device)
    tokens = load_tokens(tok, args.data, args.max_tokens)
    t0 = time.perf_counter()
    bos = tok.bos_token_id if adds_bos(tok) else None
    seqlen = _eval_window(model, args.seqlen, "--seqlen", args.model)
    progress = not args.quiet and not args.json
    if reference is None:
        value, count = perplexity(model, tokens, seqlen, args.batch_size, bos, progress)
        result = {"ppl": value, "tokens": count, "seqlen": seqlen, "seconds": time.perf_counter() - t0}
        text = f"perplexity {value:.3f} on {count} tokens ({result['seconds']:.1f} s)"
    else:
        seqlen = _eval_window(reference, seqlen, "--seqlen", args.reference)
        stats = kl_divergence(model, reference, eval_windows(tokens, seqlen, bos), args.batch_size, progress)
        result = {"ppl": stats.ppl, "tokens": stats.tokens, "seqlen": seqlen, "seconds": time.perf_counter() - t0,
                  "reference_ppl": stats.reference_ppl, "kl": stats.summary()}
        text = (f"perplexity {stats.ppl:.3f} on {stats.tokens} tokens ({result['seconds']:.1f} s); reference "
                f"perplexity {stats.reference_ppl:.3f}\nKL divergence from the reference: mean {stats.mean:.5f}, "
                f"p99 {stats.p99:.5f} nats; top-1 agreement {100 * stats.top1:.2f}%")
    print(json.dumps(result) if args.json else text)
    return 0


def _load_reference(args, model):
    """`eval --reference`: the model to compare with, loaded as MODEL is; it must share its vocabulary."""
    from .evaluate import vocab_size
    from .loading import load

    try:
        reference, _ = load(args.reference, args.dtype, trust_remote_code=args.trust_remote_code)
    except (OSError, ValueError) as e:
        raise ValueError(f"--reference: {' '.join(str(e).split())}") from None
    ours, theirs = vocab_size(model), vocab_size(reference)
    if ours != theirs:
        raise ValueError(f"--reference {args.reference} has a vocabulary of {theirs} tokens and {args.model} "
                         f"{ours}: KL divergence compares distributions over the same tokens")
    return reference


def cmd_score(args) -> int:
    from .data import Calib, calibration_batches, check_source
    from .model import load_model
    from .outdir import atomic_folder, check_output_dir

    for flag in ("samples", "heldout", "groups", "quants"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    if args.formats < 0:
        raise ValueError(f"--formats must be >= 0, got {args.formats}")
    if args.seqlen < 2:
        raise ValueError(f"--seqlen must be >= 2, got {args.seqlen}")
    if args.out:
        check_output_dir(args.out, args.overwrite, model=args.model)
    check_source(args.calib)
    model, tok = load_model(args.model, args.dtype, trust_remote_code=args.trust_remote_code)
    if args.device:
        model.to(args.device)
    _check_windows_fit(model, args.model, {"--seqlen": args.seqlen})
    windows = calibration_batches(tok, Calib(args.calib, args.samples + args.heldout, args.seqlen, args.seed))
    scoring, heldout = windows[: args.samples], windows[args.samples :]
    progress = not args.quiet
    files: dict[str, str] = {}
    plot = None
    if args.validate:
        from .validate import plot_validation, validate_scores, validation_table

        t0 = time.perf_counter()
        result = validate_scores(model, scoring, [torch.cat(heldout)], groups=args.groups, quants=args.quants,
                                 formats=args.formats, seed=args.seed, progress=progress)
        result["seconds"] = time.perf_counter() - t0
        table = validation_table(result)
        files["validation.json"] = json.dumps(result, indent=1)
        plot = lambda path: plot_validation(result, path)  # noqa: E731
    else:
        from .validate import layer_scores

        rows = layer_scores(model, scoring, progress=progress)
        names = [k for k in rows[0] if k != "block"]
        table = "\n".join(["| block | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
                          + [f"| {r['block']} | " + " | ".join(f"{r[k]:.4g}" for k in names) + " |" for r in rows])
        files["layer-scores.json"] = json.dumps(rows, indent=1)
    print(table)
    if args.out:
        files[("validation" if args.validate else "layer-scores") + ".md"] = table + "\n"
        with atomic_folder(args.out, args.overwrite) as tmp:
            for name, text in files.items():
                (tmp / name).write_text(text)
            if plot is not None:
                try:
                    plot(tmp / "validation.png")
                except ImportError:
                    print("note: no plot without matplotlib: pip install 'compress-llm-toolkit[plot]'",
                          file=sys.stderr)
        print(f"written to {args.out}")
    return 0


def cmd_convert(args) -> int:
    from .loading import load
    from .outdir import check_output_dir
    from .saving import save, stock_notes, to_dense_

    check_output_dir(args.out, args.overwrite, model=args.model)
    model, tok = load(args.model, args.dtype, trust_remote_code=args.trust_remote_code)
    if args.dense:
        to_dense_(model)
    out = save(model, tok, args.out, overwrite=args.overwrite, dtype=_save_dtype(args, model),
               sparse_format=args.sparse_format)
    for note in stock_notes(model):
        print(f"note: {note}")
    print(f"saved to {out}")
    return 0


def cmd_inspect(args) -> int:
    from .loading import describe

    rows = describe(args.model)
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(inspect_table(rows))
    return 0


def inspect_table(rows: list[dict]) -> str:
    def fmt(r: dict) -> tuple[str, ...]:
        sparsity = "-" if r["sparsity"] is None else f"{100 * r['sparsity']:.1f}%"
        group = "-" if r["group"] is None else ("row" if r["group"] == -1 else str(r["group"]))
        return (r["module"], r["type"], "-" if r["bits"] is None else str(r["bits"]), group, sparsity,
                f"{r['bytes']:,}", f"{r['bytes'] / r['fp16_bytes']:.3f}" if r["fp16_bytes"] else "-")

    table = [("module", "type", "bits", "group", "sparsity", "bytes", "x fp16")] + [fmt(r) for r in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    total, fp16 = sum(r["bytes"] for r in rows), sum(r["fp16_bytes"] for r in rows)
    lines.append(f"total {total:,} bytes = {total / fp16:.3f}x the same weights in float16 ({fp16:,} bytes)")
    for kind, what in (("quant", "quantized"), ("bitmask", "sparse-bitmask"), *((f, f) for f in FLOAT_FORMATS)):
        some = [r for r in rows if r["type"] == kind]
        if some:  # fp16_bytes is 2 bytes a weight (and bias): bits per weight = 16 · bytes / fp16_bytes
            b, f = sum(r["bytes"] for r in some), sum(r["fp16_bytes"] for r in some)
            bits = f", {16 * b / f:.2f} bits per weight" if kind in FLOAT_FORMATS else ""
            lines.append(f"{what} Linears: {b:,} bytes = {b / f:.3f}x their float16 size{bits} ({len(some)} modules)")
    return "\n".join(lines)

"""The bodies of the command-line commands (cli.py parses the arguments and reports errors):
`run` (with its streamed variant and the summary table), `eval`, `score`, `convert` and `inspect`."""

from __future__ import annotations

import json
import logging
import platform
import resource
import sys
import time
from pathlib import Path

import torch

from .fpquant import FORMATS as FLOAT_FORMATS


def _overrides(args) -> list[str]:
    flags = {
        "calib.source": args.calib, "calib.samples": args.calib_samples, "calib.seqlen": args.calib_seqlen,
        "eval.data": args.eval_data, "eval.seqlen": args.eval_seqlen, "eval.max_tokens": args.eval_max_tokens,
    }
    sets = [f"{k}={json.dumps(v) if isinstance(v, str) else v}" for k, v in flags.items() if v is not None]
    if args.no_dense_eval:
        sets.append("eval.dense=false")
    if args.eval_kl:
        sets.append("eval.kl=true")
    return sets + list(args.set)


def _peak_rss_mb() -> float:
    """This process's own peak RSS: VmHWM where /proc has it, since ru_maxrss survives exec and so
    starts at the parent's resident size when a big process launched this one."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cmd_run(args) -> int:
    from . import distributed
    from .apply import compress_
    from .data import calibration_batches, check_source, load_tokens
    from .evaluate import adds_bos, eval_windows, kl_divergence, log_probs_reader, log_probs_writer, perplexity
    from .io import round_to_storage_, save
    from .model import load_model, parameter_counts
    from .outdir import check_output_dir
    from .recipe import load_recipe

    recipe = load_recipe(args.recipe, _overrides(args))
    check_output_dir(args.out, args.overwrite, model=args.model)
    if (args.resume or args.activation_budget_mb is not None) and not args.stream:
        raise ValueError("--resume and --activation-budget-mb apply to --stream runs; add --stream")
    if args.stream:
        if distributed.launched():
            raise ValueError("--stream runs in one process: drop torchrun, or drop --stream")
        recipe = _without_eval(args, recipe)
        from .stream import check_streamable

        check_streamable(recipe)
    device = distributed.init(args.device)  # under torchrun: one process group, one GPU per rank
    main_rank = distributed.is_main()
    if not main_rank:
        logging.getLogger().setLevel(logging.WARNING)  # rank 0 reports for all
    if recipe.needs_data and recipe.calib.source != "self":
        check_source(recipe.calib.source)
    if recipe.eval.data:
        check_source(recipe.eval.data)
    if args.stream:
        return _run_streamed(args, recipe)
    model, tok = load_model(args.model, args.dtype, trust_remote_code=args.trust_remote_code)
    _check_windows_fit(model, args.model, _calib_lengths(recipe))
    progress = not args.quiet and main_rank
    batches = calibration_batches(tok, recipe.calib, model) if recipe.needs_data else None
    distill = recipe.distill  # its own windows of the calibration text, never the evaluation's
    distill_windows = calibration_batches(tok, distill.calib(recipe.calib.source), model) if distill else None
    ev = recipe.eval
    eval_tokens = load_tokens(tok, ev.data, ev.max_tokens) if ev.data else None
    eval_seqlen = _eval_window(model, ev.seqlen, "eval.seqlen", args.model, main_rank) if ev.data else ev.seqlen
    bos = tok.bos_token_id if adds_bos(tok) else None
    # eval.kl: the input model's log-probabilities wait on disk, from its evaluation to the compressed model's
    kl_windows = eval_windows(eval_tokens, eval_seqlen, bos) if ev.kl and eval_tokens is not None else None
    kl_file = _reference_file(model, kl_windows) if kl_windows is not None else None

    def ppl(sink=None) -> float:
        return perplexity(model, eval_tokens, eval_seqlen, ev.batch_size, bos, progress, sink)[0]

    report: dict = {"model": str(args.model), "recipe": str(args.recipe)}
    if eval_tokens is not None and ev.dense:
        report["dense_ppl"] = ppl(log_probs_writer(kl_file) if kl_file else None)
    dense_params = parameter_counts(model)
    result = compress_(model, recipe, batches, device=device, progress=progress, distill_windows=distill_windows)
    save_dtype = _save_dtype(args, model)
    round_to_storage_(model, save_dtype)  # the perplexity below is then the saved checkpoint's
    report.update(compress_seconds=result.seconds, peak_rss_mb=_peak_rss_mb(), sparsity=result.sparsity,
                  params=parameter_counts(model), dense_params=dense_params)
    if result.distill:
        report["distill"] = result.distill
    if kl_file is not None:
        stats = kl_divergence(model, log_probs_reader(kl_file, kl_windows), kl_windows, ev.batch_size, progress)
        kl_file.close()
        report["ppl"], report["kl"] = stats.ppl, stats.summary()
    elif eval_tokens is not None:
        report["ppl"] = ppl()
    if eval_tokens is not None:
        report["eval"] = {"data": ev.data, "seqlen": eval_seqlen, "tokens": int(eval_tokens.shape[1]),
                          "bos": bos is not None}
    _close_report(report, recipe, result)
    if main_rank:
        out = save(model, tok, args.out, recipe=recipe, report=report, overwrite=args.overwrite, dtype=save_dtype,
                   sparse_format=args.sparse_format)
        _print_done(report, model, out)
    distributed.barrier()  # the other ranks wait here until rank 0 has written the output
    return 0


def _reference_file(model, windows):
    """An unnamed temporary file (in TMPDIR; gone when closed or when the process ends) for the input
    model's float16 log-probabilities over the evaluation windows, once the disk is found to hold them."""
    import shutil
    import tempfile

    from .evaluate import vocab_size

    need, where = windows.numel() * (vocab_size(model) or 0) * 2, tempfile.gettempdir()
    free = shutil.disk_usage(where).free
    if need > free:
        raise ValueError(f"eval.kl keeps the input model's log-probabilities on disk: {need / 2**30:.1f} GiB in "
                         f"{where}, which has {free / 2**30:.1f} GiB free; set TMPDIR to a larger disk or lower "
                         "eval.max_tokens")
    return tempfile.TemporaryFile(prefix="compress-kl-")


def _save_dtype(args, model) -> torch.dtype:
    from .io import storage_dtype

    return storage_dtype(model) if args.save_dtype == "source" else getattr(torch, args.save_dtype)


def _calib_lengths(recipe) -> dict[str, int]:
    return {"calib.seqlen": recipe.calib.seqlen if recipe.needs_data else 0,
            "distill.seqlen": recipe.distill.seqlen if recipe.distill else 0}


def _check_windows_fit(model, name, lengths: dict[str, int]) -> None:
    """Calibration windows longer than the model's positions are refused before any block is
    compressed: statistics taken past the positions it was trained on (or past GPT-2's and OPT's
    position tables) would be worthless."""
    from .model import max_length

    limit = max_length(model)
    for key, seqlen in lengths.items():
        if limit and seqlen > limit:
            raise ValueError(f"{key} {seqlen} is longer than the {limit} positions {name} takes; lower {key}")


def _eval_window(model, seqlen: int, key: str, name, note: bool = True) -> int:
    """The evaluation window actually used: seqlen, capped at the model's positions with a note
    (the figure is still worth having, over shorter windows, and the window goes into the report)."""
    from .model import max_length

    limit = max_length(model)
    if not limit or seqlen <= limit:
        return seqlen
    if note:
        print(f"note: {key} {seqlen} is longer than the {limit} positions {name} takes; "
              f"evaluating in windows of {limit}", file=sys.stderr)
    return limit


def _without_eval(args, recipe):
    """--stream does not evaluate (the whole model would be loaded): an asked-for --eval-data is refused,
    a recipe's own eval section is dropped with a note that says how to evaluate the output."""
    from dataclasses import replace

    kl = f" --reference {args.model}" if recipe.eval.kl else ""
    if args.eval_data or args.eval_kl:
        flags = " and ".join(f for f, on in (("--eval-data", args.eval_data), ("--eval-kl", args.eval_kl)) if on)
        raise ValueError(f"--stream does not evaluate (that would load the whole model): drop {flags} and "
                         f"run `compress eval {args.out} --data {recipe.eval.data}{kl}` on the output")
    if recipe.eval.data:
        print(f"note: --stream skips the recipe's evaluation; afterwards run: compress eval {args.out} "
              f"--data {recipe.eval.data}{kl}", file=sys.stderr)
    return replace(recipe, eval=replace(recipe.eval, data=None, kl=False))


def _run_streamed(args, recipe) -> int:
    """`run --stream`: the model never whole in memory (stream.py); no evaluation."""
    from .apply import compress_
    from .data import calibration_batches
    from .model import parameter_counts
    from .stream import open_stream

    budget = 1024 if args.activation_budget_mb is None else args.activation_budget_mb
    model, tok, stream = open_stream(args.model, recipe, args.out, dtype=args.dtype, activation_budget_mb=budget,
                                     resume=args.resume, trust_remote_code=args.trust_remote_code,
                                     save_dtype=args.save_dtype, sparse_format=args.sparse_format)
    batches = calibration_batches(tok, recipe.calib) if recipe.needs_data else None
    _check_windows_fit(model, args.model, _calib_lengths(recipe))
    result = compress_(model, recipe, batches, device=args.device, progress=not args.quiet, stream=stream)
    report: dict = {"model": str(args.model), "recipe": str(args.recipe), "compress_seconds": result.seconds,
                    "peak_rss_mb": _peak_rss_mb(), "sparsity": result.sparsity, "params": parameter_counts(model),
                    "dense_params": stream.dense_params}
    _close_report(report, recipe, result)
    out = stream.finish(args.out, tok, recipe, report, args.overwrite)
    _print_done(report, model, out)
    return 0


def _close_report(report: dict, recipe, result) -> None:
    report["calib"] = {"source": recipe.calib.source, "samples": recipe.calib.samples,
                       "seqlen": recipe.calib.seqlen, "seed": recipe.calib.seed}
    if recipe.calib.all_experts or recipe.calib.min_expert_tokens:  # MoE coverage, only when asked
        report["calib"].update(all_experts=recipe.calib.all_experts, min_expert_tokens=recipe.calib.min_expert_tokens)
    from .distributed import world

    report["machine"] = {"cpu": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__,
                         "ranks": world()}
    report["layers"] = result.layers


def _print_done(report: dict, model, out: Path) -> None:
    from .io import stock_notes

    print(summary_table(report))
    for note in stock_notes(model):
        print(f"note: {note}")
    print(f"saved to {out}")


def cpu_name() -> str:
    """The CPU model as /proc/cpuinfo names it, else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def summary_table(report: dict) -> str:
    rows = [("setting", "perplexity", "params M", "sparsity", "weight bits", "compress s", "peak RSS MB")]
    millions = lambda key: f"{report[key]['total'] / 1e6:.1f}" if key in report else "-"  # noqa: E731
    if "dense_ppl" in report:
        rows.append(("dense", f"{report['dense_ppl']:.2f}", millions("dense_params"), "0.0%", "-", "-", "-"))
    quant = [r for r in report.get("layers", []) if r["step"] == "quantize"]
    bits = sum(r["bits"] * r["params"] for r in quant) / sum(r["params"] for r in quant) if quant else None
    rows.append((
        Path(report["recipe"]).stem, f"{report['ppl']:.2f}" if "ppl" in report else "-", millions("params"),
        f"{100 * report['sparsity']:.1f}%", f"{bits:.3g}" if bits else "-", f"{report['compress_seconds']:.1f}",
        f"{report['peak_rss_mb']:.0f}",
    ))
    if "kl" in report:  # against the input model: nothing to show on its own row
        kl = report["kl"]
        rows = [(*r, *c) for r, c in zip(rows, [("KL mean", "KL p99", "top-1"), *[("-", "-", "-")] * (len(rows) - 2),
                                                (f"{kl['mean']:.4g}", f"{kl['p99']:.4g}", f"{100 * kl['top1']:.2f}%")])]
    experts = expert_tokens(report)
    return "\n".join(_align(rows) + ([""] + _align(experts) if len(experts) > 1 else []))


def _align(rows: list[tuple[str, ...]]) -> list[str]:
    """Columns: the first left-aligned, the others right-aligned, a rule under the header."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


def expert_tokens(report: dict) -> list[tuple[str, ...]]:
    """Per MoE block of the report's rows: the calibration tokens its router gave each expert (min,
    median, max over the experts) and, with calib.min_expert_tokens, how many got fewer (those took
    all tokens); a header alone when the report has no expert rows with token counts."""
    import re
    from statistics import median

    from .model import ARCHITECTURES

    least = report.get("calib", {}).get("min_expert_tokens", 0)
    paths = "|".join(sorted({re.escape(a.experts.path) for a in ARCHITECTURES.values() if a.experts}))
    pattern = re.compile(rf"(.+)\.(?:{paths})\.(\d+)\.[^.]+")
    blocks: dict[str, dict[str, int]] = {}
    for r in report.get("layers", []):
        m = pattern.fullmatch(r["module"])
        if m and "tokens" in r:
            blocks.setdefault(m[1], {})[m[2]] = r.get("routed_tokens", r["tokens"])
    rows = [("MoE block", "expert tokens min", "median", "max", *([f"below {least}"] if least else []))]
    for block, counts in blocks.items():
        n = sorted(counts.values())
        below = [str(sum(v < least for v in n))] if least else []
        rows.append((block, str(n[0]), f"{median(n):g}", str(n[-1]), *below))
    return rows


def cmd_eval(args) -> int:
    from .data import load_tokens
    from .evaluate import adds_bos, eval_windows, kl_divergence, perplexity
    from .io import load

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
    from .io import load

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
    from .io import load, save, stock_notes, to_dense_
    from .outdir import check_output_dir

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
    from .io import describe

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

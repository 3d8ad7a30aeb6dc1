"""The body of `compress run` (cli.py parses the arguments and reports errors): load the model,
calibrate, compress, evaluate, save, and report; `run --stream` (stream.py) with the model never whole
in memory. Also the checks on window lengths and the save dtype that other commands share
(commands.py). The table printed at the end is in run_summary.py."""

from __future__ import annotations

import json
import logging
import resource
import sys
from pathlib import Path

import torch

from .run_summary import cpu_name, summary_table


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
    from .model import load_model, parameter_counts
    from .outdir import check_output_dir
    from .recipe import load_recipe
    from .saving import round_to_storage_, save

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
    from .saving import storage_dtype

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
    from .saving import stock_notes

    print(summary_table(report))
    for note in stock_notes(model):
        print(f"note: {note}")
    print(f"saved to {out}")

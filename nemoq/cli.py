"""nemoq command line: parses arguments, calls the library, shows progress and tables."""

from __future__ import annotations

import re
import signal
import sys
from enum import Enum
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape

from nemoq.errors import NemoqError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Faithful, fast GGUF files from NVIDIA Nemotron-H hybrid Mamba2/MoE checkpoints.")
console = Console(stderr=True)
state = {"verbose": False}


class OutType(str, Enum):
    auto = "auto"
    f32 = "f32"
    f16 = "f16"
    bf16 = "bf16"
    q8_0 = "q8_0"


SIZE_UNITS = {"": 1, "K": 1000, "M": 1000**2, "G": 1000**3, "T": 1000**4}


def parse_size(text: str) -> int:
    """'5G' -> 5e9 bytes (decimal units, as llama.cpp's --split-max-size)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)B?\s*", text.upper())
    if not m:
        raise typer.BadParameter(f"{text!r} is not a size like 5G, 500M or 1000000")
    return int(float(m.group(1)) * SIZE_UNITS[m.group(2)])


@app.callback()
def main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Show tracebacks for errors, and "
                                     "llama.cpp's own log lines in eval.")) -> None:
    state["verbose"] = verbose


@app.command()
def convert(
    src: str = typer.Argument(..., help="Checkpoint folder or hub repo id (owner/name)."),
    outfile: Path = typer.Option(..., "--outfile", "-o", help="Output .gguf path."),
    outtype: OutType = typer.Option(OutType.auto, help="Type of the weight matrices "
                                    "(norms, SSM parameters and the router always stay F32)."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing output."),
    split_max_size: Optional[str] = typer.Option(None, help="Split the output into files of at most "
                                                 "this size (e.g. 5G), named as llama.cpp's gguf-split does."),
    strict: bool = typer.Option(False, "--strict", help="Treat NaN/Inf weights as an error."),
    pre: Optional[str] = typer.Option(None, help="llama.cpp pre-tokenizer name, when nemoq does not "
                                      "recognise the tokenizer's regex."),
) -> None:
    """Convert a Nemotron-H MoE checkpoint (hub or transformers-5 layout) to GGUF."""
    _run(_convert, src, outfile, outtype.value, pre, force=force,
         split_max_size=parse_size(split_max_size) if split_max_size else 0, strict=strict)


def _convert(src: str, outfile: Path, outtype: str, pre: Optional[str], **options) -> None:
    from nemoq import report
    from nemoq.convert.pipeline import dominant_dtype, float_chooser, open_checkpoint_source, plan_bytes, write_gguf

    source = open_checkpoint_source(src, pre)
    if outtype in ("auto", "f32", "f16", "bf16"):
        choose, file_type = float_chooser(outtype, dominant_dtype(source.plan))
        fallbacks = []
    else:
        from nemoq.quant.recipes import RECIPES, chooser, plan_types
        recipe = RECIPES[outtype.upper()]
        typed = plan_types([t.spec for t in source.plan.tensors], recipe, source.layer_kinds)
        choose, file_type = chooser(typed), recipe.file_type
        fallbacks = [(t.spec.name, f"{t.fallback_why}: {t.type}") for t in typed if t.fell_back]
    console.print(f"[bold]{escape(str(source.path))}[/]: {len(source.plan.tensors)} tensors, {source.description}")
    with report.byte_progress(console, "converting", plan_bytes(source.plan)) as advance:
        result = write_gguf(source, outfile, choose, file_type, on_progress=advance, **options)
    report.conversion_summary(console, result, fallbacks)
    _say_llama_cpp_build([t.name for t in result.tensors])


@app.command()
def quantize(
    src: str = typer.Argument(..., help="Checkpoint folder or hub repo id (with --dry-run, config.json is enough)."),
    outfile: Optional[Path] = typer.Option(None, "--outfile", "-o", help="Output .gguf path."),
    recipe: str = typer.Option("NQ4", help="Recipe name, as llama.cpp spells it (Q4_K_M, Q8_0, ...) or nemoq's NQ4/NQ5."),
    tensor_type: list[str] = typer.Option([], "--tensor-type", help="REGEX=TYPE override, may repeat."),
    imatrix: Optional[Path] = typer.Option(None, "--imatrix", help="Importance matrix (llama.cpp's GGUF or "
                                           "legacy .dat format) weighting every format's error."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the per-tensor plan, size and true bits "
                                 "per weight without reading weights or writing anything."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing output."),
    split_max_size: Optional[str] = typer.Option(None, help="Split the output into files of at most this size."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="Quantizer threads (default: all cores)."),
    tensor_scales: bool = typer.Option(True, "--tensor-scales/--no-tensor-scales",
                                       help="Give NVFP4/MXFP4 matrices a per-matrix `.scale` tensor (better "
                                       "quality; llama.cpp builds without NVFP4 support cannot load it)."),
    calibrate: bool = typer.Option(False, "--calibrate", help="Run calibration text through the model layer by "
                                   "layer and round every quantized matrix with error compensation (GPTQ) "
                                   "through its inputs' statistics: lower KLD, same bytes per weight."),
    data: Optional[Path] = typer.Option(None, "--data", help="With --calibrate: calibration text, as for "
                                        "nemoq calibrate (default: the corpus nemoq ships, train split)."),
    tokens: Optional[int] = typer.Option(None, "--tokens", min=1, help="With --calibrate: use at most this many "
                                         "tokens (default 65536)."),
    ctx: Optional[int] = typer.Option(None, "--ctx", min=2, help="With --calibrate: tokens per sequence (default 512)."),
    device: Optional[str] = typer.Option(None, "--device", help="With --calibrate: auto (cuda > mps > cpu), cpu, "
                                         "cuda or mps."),
    imatrix_out: Optional[Path] = typer.Option(None, "--imatrix-out", help="With --calibrate: also write the "
                                               "importance matrix (llama.cpp's format) of the same tokens."),
) -> None:
    """Quantize a checkpoint in one pass with a recipe (types per tensor, honest about bits)."""
    from nemoq import kernels_c
    kernels_c.THREADS = threads
    split = parse_size(split_max_size) if split_max_size else 0
    calibration = {"data": data, "tokens": tokens, "ctx": ctx, "device": device, "imatrix_out": imatrix_out}
    if calibrate:
        _run(_quantize_calibrated, src, outfile, recipe, tensor_type, tensor_scales, dry_run, imatrix,
             {k: v for k, v in calibration.items() if v is not None}, force=force, split_max_size=split)
        return
    given = [f"--{k.replace('_', '-')}" for k, v in calibration.items() if v is not None]
    _run(_quantize, src, outfile, recipe, tensor_type, dry_run, imatrix, tensor_scales, given, force=force,
         split_max_size=split)


def _report_plan(typed, specs, layer_kinds, recipe, table: bool = True) -> None:
    """The plan's summary, and when most of the weights fell back, the recipes that fit."""
    from nemoq import report
    from nemoq.quant.recipes import recipes_that_fit, summarize
    summary = summarize(typed)
    alternatives = recipes_that_fit(specs, layer_kinds) if summary.warn_fallbacks else []
    report.quant_plan(Console(), typed, summary, recipe, table=table, alternatives=alternatives)


def _warn(warnings: list[str]) -> None:
    for w in warnings:
        console.print(f"[yellow]warning[/]: {escape(w)}", highlight=False, soft_wrap=True)


NO_SCALES_HINT = "; --no-tensor-scales writes the file without them"


def _say_llama_cpp_build(tensor_names, planned: bool = False, hint: str = "") -> None:
    """One line when a file carries `.scale` companions: the llama.cpp build it needs."""
    from nemoq.convert.mapping import llama_cpp_build_for
    names = [n for n in tensor_names if n.endswith((".scale", ".input_scale"))]
    build = llama_cpp_build_for(names)
    if build:
        carries = "the file will carry" if planned else "this file carries"
        console.print(f"{carries} {len(names)} .scale tensor(s): it needs llama.cpp b{build} or newer (older builds "
                      f"refuse the file or run it without the scales; docs/quantize.md){hint}",
                      highlight=False, soft_wrap=True)


def _recipe_and_overrides(recipe_name: str, overrides: list[str]):
    from nemoq.quant.recipes import RECIPES, parse_override
    recipe = RECIPES.get(recipe_name.upper())
    if recipe is None:
        raise NemoqError(f"unknown recipe {recipe_name!r}; known: {', '.join(RECIPES)}")
    try:
        return recipe, [parse_override(o) for o in overrides]
    except ValueError as e:
        raise NemoqError(str(e)) from None


def _quantize(src: str, outfile: Optional[Path], recipe_name: str, overrides: list[str], dry_run: bool,
              imatrix_path: Optional[Path], tensor_scales: bool = True, calibration_options: list[str] = (),
              **options) -> None:
    from nemoq import report
    from nemoq.quant.recipes import chooser, file_type_of, override_warnings, plan_types, recipe_label
    if calibration_options:
        raise NemoqError(f"{', '.join(calibration_options)} only go with --calibrate")
    recipe, parsed = _recipe_and_overrides(recipe_name, overrides)
    if dry_run:
        from nemoq.convert.config import load_config
        from nemoq.convert.plan import tensor_specs
        from nemoq.convert.source import resolve_config
        config = load_config(resolve_config(src))
        specs = tensor_specs(config)
        _warn(override_warnings(specs, parsed))
        typed = plan_types(specs, recipe, config.layer_kinds, parsed, tensor_scales)
        _report_plan(typed, specs, config.layer_kinds, recipe)
        from nemoq.quant.tensor_scale import scale_name, takes_scale
        _say_llama_cpp_build([scale_name(t.spec.name) for t in typed if t.scaled and takes_scale(t.spec, t.type)],
                             planned=True, hint=NO_SCALES_HINT)
        return
    if outfile is None:
        raise NemoqError("--outfile is required (or use --dry-run)")
    from nemoq.convert.pipeline import open_source, plan_bytes, write_gguf
    source = open_source(src)
    specs = [t.spec for t in source.plan.tensors]
    _warn(override_warnings(specs, parsed))
    typed = plan_types(specs, recipe, source.layer_kinds, parsed, tensor_scales)
    imatrix = None
    if imatrix_path is not None:
        from nemoq.calib.imatrix_file import read_imatrix
        from nemoq.quant.recipes import check_imatrix
        imatrix = read_imatrix(imatrix_path)
        uncovered = check_imatrix(typed, imatrix, imatrix_path)
        if uncovered:
            console.print(f"[yellow]imatrix has no statistics for {len(uncovered)} quantized tensor(s)[/] "
                          f"(e.g. {escape(uncovered[0])}): quantized without importance")
    with report.byte_progress(console, "quantizing", plan_bytes(source.plan)) as advance:
        result = write_gguf(source, outfile, chooser(typed, imatrix), file_type_of(recipe, typed, source.layer_kinds),
                            recipe=recipe_label(recipe, parsed), on_progress=advance, **options)
    _report_plan(typed, specs, source.layer_kinds, recipe, table=False)
    report.conversion_summary(console, result, [])
    _say_llama_cpp_build([t.name for t in result.tensors], hint=NO_SCALES_HINT)
    _report_kept(result)


def _report_kept(result) -> None:
    from nemoq.convert.modelopt_gguf import kept_as_stored
    kept = kept_as_stored(result.tensors)
    if kept:
        console.print(f"kept {len(kept)} ModelOpt NVFP4 tensor(s) as the checkpoint stores them "
                      f"(e.g. {escape(kept[0])})")


def _quantize_calibrated(src: str, outfile: Optional[Path], recipe_name: str, overrides: list[str],
                         tensor_scales: bool, dry_run: bool, imatrix_path: Optional[Path], calibration: dict,
                         **options) -> None:
    from nemoq import report
    from nemoq.calib.calibrated import quantize_calibrated
    if dry_run:
        raise NemoqError("--dry-run plans without reading weights, --calibrate runs the model: use one of them")
    if imatrix_path is not None:
        raise NemoqError("--calibrate computes its own statistics from the calibration text; --imatrix is for "
                         "quantizing without it: use one of them")
    if outfile is None:
        raise NemoqError("--outfile is required")
    recipe, parsed = _recipe_and_overrides(recipe_name, overrides)
    with report.layer_progress(console, "calibrated quantizing") as (on_start, on_progress):
        result = quantize_calibrated(src, outfile, recipe, overrides=parsed, tensor_scales=tensor_scales,
                                     on_start=on_start, on_progress=on_progress, **calibration, **options)
    from nemoq.quant.recipes import override_warnings
    _warn(override_warnings([t.spec for t in result.typed], parsed))
    _report_plan(result.typed, [t.spec for t in result.typed], result.layer_kinds, recipe, table=False)
    report.calibration_summary(Console(), result)
    report.conversion_summary(console, result.conversion, [])
    _say_llama_cpp_build([t.name for t in result.conversion.tensors], hint=NO_SCALES_HINT)
    _report_kept(result.conversion)
    if result.imatrix_output is not None:
        console.print(f"[green]wrote[/] {escape(str(result.imatrix_output))}")


@app.command()
def calibrate(
    src: str = typer.Argument(..., help="Checkpoint folder, hub repo id, or an F32/F16/BF16 GGUF."),
    outfile: Path = typer.Option(..., "--outfile", "-o", help="Output imatrix .gguf path (llama.cpp's format)."),
    data: Optional[Path] = typer.Option(None, "--data", help="Calibration text: a .txt file, a .jsonl file "
                                        "(\"text\" or \"messages\" records) or a folder of them "
                                        "(default: the corpus nemoq ships, train split)."),
    tokens: int = typer.Option(65536, "--tokens", min=1, help="Use at most this many tokens."),
    ctx: int = typer.Option(512, "--ctx", min=2, help="Tokens per sequence."),
    device: str = typer.Option("auto", "--device", help="auto (cuda > mps > cpu), cpu, cuda or mps."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing output."),
) -> None:
    """Compute an importance matrix (per-column mean x^2 of every quantized matrix) for quantize --imatrix."""
    _run(_calibrate, src, outfile, data, tokens, ctx, device, force)


def _calibrate(src: str, outfile: Path, data: Optional[Path], tokens: int, ctx: int, device: str, force: bool) -> None:
    from nemoq import report
    from nemoq.calib.calibrate import calibrate
    from nemoq.calib.coverage import FALLBACK, FEW_SHARE

    with report.layer_progress(console, "calibrating") as (on_start, on_progress):
        result = calibrate(src, outfile, data=data, tokens=tokens, ctx=ctx, device=device, force=force,
                           on_start=on_start, on_progress=on_progress)
    report.expert_coverage(Console(), result.coverage, FEW_SHARE, FALLBACK)
    console.print(f"{result.tokens:,} tokens on {result.device} in {result.seconds:.1f} s "
                  f"({result.tokens / max(result.seconds, 1e-9):,.0f} tokens/s), "
                  f"{len(result.imatrix.sums)} matrices")
    console.print(f"[green]wrote[/] {escape(str(result.output))}")


@app.command("eval")
def eval_command(
    models: list[Path] = typer.Argument(..., metavar="MODEL", help="The GGUF file to evaluate "
                                        "(with --compare: several)."),
    data: Optional[Path] = typer.Option(None, "--data", help="UTF-8 text to evaluate on."),
    ctx: int = typer.Option(512, "--ctx", min=4, help="Tokens per chunk; the second half of each is scored."),
    chunks: Optional[int] = typer.Option(None, "--chunks", min=1, help="Evaluate at most this many chunks."),
    base: Optional[Path] = typer.Option(None, "--base", help="Base GGUF (e.g. the F16) for KLD, run side by side."),
    base_logits: Optional[Path] = typer.Option(None, "--base-logits", help="A --save-logits file instead of --base."),
    save_logits: Optional[Path] = typer.Option(None, "--save-logits", help="Save the base's top-k log-probs "
                                               "(--base's, or the model's own without --base)."),
    top_k: int = typer.Option(256, "--top-k", min=1, help="Log-probs kept per token by --save-logits."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write every number to this JSON file."),
    baseline: Optional[Path] = typer.Option(None, "--baseline", help="Fail when worse than this --json result."),
    tolerance: float = typer.Option(2.0, "--tolerance", min=0, help="Allowed worsening vs --baseline, "
                                    "in combined standard errors."),
    max_ppl_ratio: Optional[float] = typer.Option(None, "--max-ppl-ratio", help="Gate: PPL(model)/PPL(base) at most."),
    max_kld: Optional[float] = typer.Option(None, "--max-kld", help="Gate: mean KLD at most."),
    min_top1: Optional[float] = typer.Option(None, "--min-top1", help="Gate: same top-1 token share at least."),
    compare: bool = typer.Option(False, "--compare", help="Compare several models against --base in one table."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="With --compare: bits per weight vs KLD as a PNG."),
    noise_floor: bool = typer.Option(False, "--noise-floor", help="Also measure the base against itself re-run."),
    noise_floor_model: Optional[Path] = typer.Option(None, "--noise-floor-model", help="Also measure the base "
                                                     "against this file (e.g. the BF16 of an F16 base)."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="llama.cpp threads (default: all cores)."),
    force: bool = typer.Option(False, "--force", help="Overwrite existing outputs."),
) -> None:
    """Perplexity, KL divergence against a base model, and a CI gate (exit 1 when it fails)."""
    gates = {"max_ppl_ratio": max_ppl_ratio, "max_kld": max_kld, "min_top1": min_top1}
    gated = any(v is not None for v in gates.values()) or baseline is not None
    conflicts = (   # (wrong, what to say): usage errors, exit code 2
        (not compare and len(models) != 1, "give one model, or several with --compare"),
        (data is None, "--data is required"),
        (base is not None and base_logits is not None, "--base and --base-logits exclude each other"),
        (base_logits is not None and save_logits is not None, "--save-logits needs a base model, not --base-logits"),
        (compare and base is None, "--compare needs --base"),
        (compare and (base_logits or save_logits or gated), "--compare takes no --base-logits, --save-logits or gate"),
        (plot is not None and not compare, "--plot goes with --compare"),
        ((noise_floor or noise_floor_model) and base is None, "--noise-floor needs --base"),
        (any(v is not None for v in gates.values()) and base is None and base_logits is None,
         "--max-ppl-ratio, --max-kld and --min-top1 need --base or --base-logits"),
    )
    for wrong, message in conflicts:
        if wrong:
            raise typer.BadParameter(message)
    _run(_eval, models, data, ctx, chunks, base, base_logits, save_logits, top_k, json_out, baseline, tolerance,
         gates, compare, plot, noise_floor, noise_floor_model, threads, force)


def _eval(models, data, ctx, chunks, base, base_logits, save_logits, top_k, json_out, baseline, tolerance, gates,
          compare, plot, noise_floor, noise_floor_model, threads, force) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
    from nemoq.eval import gate, report as eval_report, results, run
    from nemoq.eval.model import LLAMA_LOGS
    from nemoq.eval.text import load_text
    from nemoq.files import claim_outputs
    LLAMA_LOGS.show = state["verbose"]    # otherwise its lines land among the tables
    outputs = [p for p in (json_out, save_logits, plot) if p is not None]
    with claim_outputs(outputs, force):   # before a long run: not written over, nor by two runs at once
        if plot is not None:
            from nemoq.eval.plot import pyplot
            pyplot()
        opts = run.RunOptions(text=load_text(data), data=data, ctx=ctx, chunks=chunks, threads=threads, top_k=top_k,
                              force=force)
        previous = results.read_baseline(baseline) if baseline is not None else None
        columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
        with Progress(*columns, console=console, transient=True) as progress:
            def track(label: str, total: int):
                task = progress.add_task(label, total=total)
                return lambda: progress.advance(task)
            if compare:
                record = run.compare(models, base, opts, noise_floor_model, track=track)
            else:
                record = run.evaluate(models[0], opts, base=base, base_logits=base_logits, save_logits=save_logits,
                                      noise_floor=noise_floor, noise_floor_model=noise_floor_model, track=track)
        out = Console(width=None if sys.stdout.isatty() else 120)   # CI logs: room for file names
        if compare:
            eval_report.compare_table(out, record)
            if plot is not None:
                from nemoq.eval.plot import plot_compare
                plot_compare(record, plot, force)
                console.print(f"[green]wrote[/] {escape(str(plot))}")
        else:
            eval_report.eval_summary(out, record)
            checks = gate.check_limits(record, gates)
            if previous is not None:
                checks += gate.check_baseline(record, previous, baseline, tolerance)
            record = gate.with_gates(record, checks)
            if checks:
                eval_report.gate_table(out, checks)
        if save_logits is not None:
            console.print(f"[green]wrote[/] {escape(str(save_logits))}")
        if json_out is not None:
            results.write_json(record, json_out, force)
            console.print(f"[green]wrote[/] {escape(str(json_out))}")
        if not record.get("passed", True):
            console.print("[bold red]gate failed[/]")
            raise typer.Exit(1)


@app.command()
def info(
    file: Optional[Path] = typer.Argument(None, help="A .gguf file (the first of a split set reads them all)."),
    max_tensors: int = typer.Option(0, help="Show at most this many tensors (0: all)."),
    kernels: bool = typer.Option(False, "--kernels",
                                 help="Show whether the C and CUDA kernels are built (nvcc's first build takes minutes), "
                                      "and whether a GPU is there."),
) -> None:
    """Show a GGUF file's metadata and tensor table, or the state of nemoq's C and CUDA kernels."""
    from nemoq import report
    if kernels:
        from nemoq import kernels_c
        from nemoq.kernels_c import cuda, cuda_quant, moe
        report.kernel_info(Console(), kernels_c.status(), kernels_c.KERNEL_FORMATS, moe.MOE_FORMATS, moe.row_dots())
        report.cuda_info(Console(), cuda.cuda_status(), cuda.MOE_FORMATS, cuda_quant.CUDA_QUANT_FORMATS)
    if file is not None:
        from nemoq.gguf_file import read_gguf
        _run(lambda: report.gguf_info(Console(), read_gguf(file), max_tensors))
    elif not kernels:
        raise typer.BadParameter("give a GGUF file, or --kernels")


def _run(fn, *args, **kwargs) -> None:
    from nemoq import files
    with files.command_scope(on_stale=_report_reclaimed) as scope:
        try:
            fn(*args, **kwargs)
        except NemoqError as e:
            if state["verbose"]:
                console.print_exception()
            console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
            raise typer.Exit(1)
        except KeyboardInterrupt as e:   # Ctrl-C, and SIGTERM / SIGHUP as files.Interrupted
            signum = getattr(e, "signum", signal.SIGINT)
            how = "" if signum == signal.SIGINT else f" by {signal.Signals(signum).name}"
            done = (f"{', '.join(escape(str(p)) for p in scope.written)} written, nothing else" if scope.written
                    else "no output was written")
            console.print(f"[bold red]interrupted[/]{how}: {done}", highlight=False, soft_wrap=True)
            raise typer.Exit(128 + signum)


def _report_reclaimed(out: Path, folders: int, nbytes: int) -> None:
    from nemoq.report import human_bytes
    console.print(f"removed {folders} partial folder{'s' if folders > 1 else ''} left by stopped runs beside "
                  f"{escape(out.name)}: "
                  f"{human_bytes(nbytes)} ({nbytes:,} bytes) reclaimed", highlight=False, soft_wrap=True)

if __name__ == "__main__":
    sys.exit(app())

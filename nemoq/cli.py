"""nemoq command line: parses arguments into each command's options (nemoq.commands), calls the
command, and shows its progress, messages and tables."""

from __future__ import annotations

import re
import signal
import sys
from contextlib import contextmanager
from enum import Enum
from functools import partial
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


SIZE_UNITS = {"": 1, "K": 1000, "M": 1000**2, "G": 1000**3, "T": 1000**4,
              "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}


def parse_size(text: str) -> int:
    """'5G' -> 5e9 bytes (decimal units, as llama.cpp's --split-max-size); '24GiB' -> 24 x 2^30
    (binary, as GPU memory is counted)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]I?)?B?\s*", text.upper())
    if not m:
        raise typer.BadParameter(f"{text!r} is not a size like 5G, 500M, 24GiB or 1000000")
    return int(float(m.group(1)) * SIZE_UNITS[m.group(2) or ""])


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
    no_mtp: bool = typer.Option(False, "--no-mtp", help="Leave out the multi-token-prediction block "
                                "(kept by default, as llama.cpp's converter keeps it)."),
) -> None:
    """Convert a Nemotron-H MoE checkpoint (hub or transformers-5 layout) to GGUF."""
    from nemoq.commands.base import Output
    from nemoq.commands.convert import ConvertOptions
    opts = ConvertOptions(src, Output(outfile, force, _split_size(split_max_size)), outtype.value, pre, strict,
                          mtp=not no_mtp)
    _run(_convert, opts)


def _split_size(text: Optional[str]) -> int:
    return parse_size(text) if text else 0


def _convert(opts) -> None:
    from nemoq import report
    from nemoq.commands.convert import convert

    def on_source(source) -> None:
        console.print(f"[bold]{escape(str(source.path))}[/]: {len(source.plan.tensors)} tensors, {source.description}")
    outcome = convert(opts, on_source, partial(report.byte_progress, console))
    report.conversion_summary(console, outcome.result, outcome.fallbacks)
    _say_scales(outcome.scales)


@app.command()
def quantize(
    src: str = typer.Argument(..., help="Checkpoint folder or hub repo id (with --dry-run, config.json is enough)."),
    outfile: Optional[Path] = typer.Option(None, "--outfile", "-o", help="Output .gguf path."),
    recipe: Optional[str] = typer.Option(None, help="Recipe name, as llama.cpp spells it (Q4_K_M, Q8_0, ...) or "
                                         "nemoq's NQ4/NQ5 (default NQ4)."),
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
    target_size: Optional[str] = typer.Option(None, "--target-size", help="Instead of a recipe: per tensor the "
                                              "types with the least predicted KLD whose file is at most this "
                                              "size (e.g. 18G, 4.9M), from a profile."),
    target_bpw: Optional[float] = typer.Option(None, "--target-bpw", min=0.5, help="As --target-size, for a file "
                                               "of at most this many bits per weight (header included)."),
    profile: Optional[Path] = typer.Option(None, "--profile", help="With --target-size/--target-bpw/--fit: a "
                                           "nemoq profile of this model (default: profile first, in the same run)."),
    fit: Optional[str] = typer.Option(None, "--fit", help="As --target-size, for a device with this much memory "
                                      "(e.g. 24GiB): less what llama.cpp needs beside the weights at --fit-ctx."),
    fit_ctx: Optional[int] = typer.Option(None, "--fit-ctx", min=1, help="With --fit: the context (tokens) "
                                          "llama.cpp will run the file at."),
    kv_type: Optional[str] = typer.Option(None, "--kv-type", help="With --fit: llama.cpp's K/V cache type, f16 "
                                          "(default) or q8_0 (which needs flash attention)."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="With --target-size/--target-bpw/--fit: draw "
                                        "predicted size vs KLD (PNG): the allocator's frontier, the chosen file, "
                                        "nemoq's and llama.cpp's recipes."),
) -> None:
    """Quantize a checkpoint in one pass with a recipe (types per tensor, honest about bits)."""
    from nemoq.commands.base import Output
    from nemoq.commands.quantize import CalibrationOptions, QuantizeOptions, RecipeOptions
    opts = QuantizeOptions(
        src, Output(outfile, force, _split_size(split_max_size)),
        RecipeOptions(recipe or RecipeOptions.name, tuple(tensor_type), tensor_scales), imatrix=imatrix, dry_run=dry_run, threads=threads,
        calibration=CalibrationOptions(calibrate, data, tokens, ctx, device, imatrix_out))
    budgets = [name for name, v in (("--target-size", target_size), ("--target-bpw", target_bpw), ("--fit", fit))
               if v is not None]
    if len(budgets) > 1:
        raise typer.BadParameter(f"{' and '.join(budgets)} are each a budget: give one")
    if fit is None and (fit_ctx is not None or kv_type is not None):
        raise typer.BadParameter("--fit-ctx and --kv-type go with --fit")
    if budgets or profile is not None or plot is not None:
        if not budgets:
            raise typer.BadParameter(f"{'--profile' if profile is not None else '--plot'} goes with --target-size, "
                                     f"--target-bpw or --fit")
        if recipe is not None:
            raise typer.BadParameter("a byte budget chooses the types: leave out --recipe")
        from nemoq.commands.profile import TargetOptions
        size = parse_size(target_size) if target_size is not None else None
        _run(_quantize_target, opts, TargetOptions(size, target_bpw, profile, _fit(fit, fit_ctx, kv_type), plot))
        return
    _run(_quantize, opts)


def _fit(memory: Optional[str], ctx: Optional[int], kv_type: Optional[str]):
    if memory is None:
        return None
    if ctx is None:
        raise typer.BadParameter("--fit needs --fit-ctx: the context llama.cpp will run the file at")
    from nemoq.quant.fit import Fit
    return Fit(parse_size(memory), ctx, (kv_type or "f16").lower())


def _quantize_target(opts, target) -> None:
    from nemoq import report
    from nemoq.commands.base import scale_notice
    from nemoq.commands.profile import quantize_to_target
    from nemoq.report_profile import target_plan
    outcome = quantize_to_target(opts, target, partial(target_plan, Console(), table=opts.dry_run),
                                 partial(report.layer_progress, console), _ablation_progress)
    if target.plot is not None:
        console.print(f"[green]wrote[/] {escape(str(target.plot))}")
    if outcome is None:   # --dry-run
        return
    if outcome.calibration is not None:
        report.calibration_summary(Console(), outcome.calibration)
    report.conversion_summary(console, outcome.conversion, [])
    _say_scales(scale_notice(t.name for t in outcome.conversion.tensors), NO_SCALES_HINT)


def _ablation_progress(done: int, total: int) -> None:
    console.print(f"streamed forward (one-tensor ablations, then the fit mixes): step {done}/{total}",
                  highlight=False)


@app.command("profile")
def profile_command(
    src: str = typer.Argument(..., help="Checkpoint folder, hub repo id, or an F32/F16/BF16 GGUF."),
    outfile: Path = typer.Option(..., "--outfile", "-o", help="Output profile (JSON)."),
    data: Optional[Path] = typer.Option(None, "--data", help="Calibration text, as for nemoq calibrate "
                                        "(default: the corpus nemoq ships, train split)."),
    tokens: Optional[int] = typer.Option(None, "--tokens", min=1, help="Calibration tokens (default 16384)."),
    ctx: Optional[int] = typer.Option(None, "--ctx", min=2, help="Tokens per sequence (default 512)."),
    device: Optional[str] = typer.Option(None, "--device", help="auto (cuda > mps > cpu), cpu, cuda or mps."),
    calibrate: bool = typer.Option(False, "--calibrate", help="Also measure --calibrate's (error-compensated) "
                                   "rounding, for quantize --target-size --calibrate."),
    sensitivity_tokens: Optional[int] = typer.Option(None, "--sensitivity-tokens", min=1, help="Tokens "
                                                     "scored per one-tensor ablation (default 1024)."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing output."),
) -> None:
    """Measure per tensor and candidate type the bytes and predicted KLD that quantize --target-size chooses from."""
    from nemoq.commands.base import Output
    from nemoq.commands.profile import ProfileOptions
    _run(_profile, ProfileOptions(src, Output(outfile, force), data, tokens, ctx, device, calibrate, sensitivity_tokens))


def _profile(opts) -> None:
    from nemoq import report
    from nemoq.commands.profile import profile
    from nemoq.report_profile import profile_summary
    result = profile(opts, partial(report.layer_progress, console), _ablation_progress)
    profile_summary(Console(), result)
    console.print(f"[green]wrote[/] {escape(str(opts.output.path))}")


NO_SCALES_HINT = "; --no-tensor-scales writes the file without them"


def _quantize(opts) -> None:
    from nemoq import report
    from nemoq.commands.quantize import quantize
    outcome = quantize(opts, _show_plan_warnings, partial(report.byte_progress, console),
                       partial(report.layer_progress, console))
    plan = outcome.plan
    report.quant_plan(Console(), plan.typed, plan.summary, plan.recipe, table=opts.dry_run,
                      alternatives=plan.alternatives())
    if outcome.calibration is not None:
        report.calibration_summary(Console(), outcome.calibration)
    if outcome.result is not None:
        report.conversion_summary(console, outcome.result, [])
    _say_scales(outcome.scales, NO_SCALES_HINT)
    if outcome.kept:
        console.print(f"kept {len(outcome.kept)} ModelOpt NVFP4 tensor(s) as the checkpoint stores them "
                      f"(e.g. {escape(outcome.kept[0])})")
    if outcome.imatrix_output is not None:
        console.print(f"[green]wrote[/] {escape(str(outcome.imatrix_output))}")


def _show_plan_warnings(plan) -> None:
    for w in plan.warnings:
        console.print(f"[yellow]warning[/]: {escape(w)}", highlight=False, soft_wrap=True)
    if plan.uncovered:
        console.print(f"[yellow]imatrix has no statistics for {len(plan.uncovered)} quantized tensor(s)[/] "
                      f"(e.g. {escape(plan.uncovered[0])}): quantized without importance")


def _say_scales(notice, hint: str = "") -> None:
    """One line when a file carries `.scale` companions: the llama.cpp build it needs."""
    if notice is not None:
        carries = "the file will carry" if notice.planned else "this file carries"
        console.print(f"{carries} {notice.count} .scale tensor(s): it needs llama.cpp b{notice.build} or newer "
                      f"(older builds refuse the file or run it without the scales; docs/quantize.md){hint}",
                      highlight=False, soft_wrap=True)


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
    from nemoq.commands.base import Output
    from nemoq.commands.calibrate import CalibrateOptions
    _run(_calibrate, CalibrateOptions(src, Output(outfile, force), data, tokens, ctx, device))


def _calibrate(opts) -> None:
    from nemoq import report
    from nemoq.commands.calibrate import calibrate
    result = calibrate(opts, partial(report.layer_progress, console))
    from nemoq.calib.coverage import FALLBACK, FEW_SHARE
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
    from nemoq.commands.evaluate import BaseOptions, EvalInputs, EvalOptions, GateOptions, usage_error
    opts = EvalOptions(
        EvalInputs(tuple(models), data, ctx, chunks),
        BaseOptions(base, base_logits, save_logits, top_k, noise_floor, noise_floor_model),
        GateOptions(max_ppl_ratio, max_kld, min_top1, baseline, tolerance),
        compare=compare, plot=plot, json_out=json_out, threads=threads, force=force, llama_logs=state["verbose"])
    problem = usage_error(opts)
    if problem:
        raise typer.BadParameter(problem)   # a usage error: exit code 2
    _run(_eval, opts)


def _eval(opts) -> None:
    from nemoq.commands.evaluate import evaluate
    from nemoq.eval import report as eval_report
    outcome = evaluate(opts, _tracks)
    out = Console(width=None if sys.stdout.isatty() else 120)   # CI logs: room for file names
    if opts.compare:
        eval_report.compare_table(out, outcome.record)
    else:
        eval_report.eval_summary(out, outcome.record)
        if outcome.checks:
            eval_report.gate_table(out, outcome.checks)
    for path in outcome.written:
        console.print(f"[green]wrote[/] {escape(str(path))}")
    if not outcome.passed:
        console.print("[bold red]gate failed[/]")
        raise typer.Exit(1)


@contextmanager
def _tracks():
    """eval's progress: one bar per scored file, gone when the tables come."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        def track(label: str, total: int):
            task = progress.add_task(label, total=total)
            return lambda: progress.advance(task)
        yield track


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

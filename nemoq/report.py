"""rich rendering for the CLI: progress bars and summary tables. Library code never prints."""

from __future__ import annotations

from collections import defaultdict
from contextlib import contextmanager
from typing import Callable, Iterator

from rich.console import Console
from rich.markup import escape
from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn, TransferSpeedColumn)
from rich.table import Table

STRING_PREVIEW = 60
ARRAY_PREVIEW = 8


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


@contextmanager
def byte_progress(console: Console, label: str, total: int) -> Iterator[Callable[[int], None]]:
    columns = (TextColumn(f"[bold]{label}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
               TimeRemainingColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(label, total=total)
        yield lambda n: progress.advance(task, n)


@contextmanager
def layer_progress(console: Console, label: str) -> Iterator[tuple[Callable, Callable]]:
    """(on_start(sequences, steps), on_progress(forward.Progress)) for the layer-streamed commands."""
    columns = (TextColumn(f"[bold]{label}"), BarColumn(), TextColumn("{task.completed}/{task.total} layers"),
               TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())
    with Progress(*columns, console=console) as progress:
        task = progress.add_task(label, total=None, rate="")

        def on_start(sequences: int, steps: int) -> None:
            console.print(f"{sequences} calibration sequences through {steps - 1} layers and the output head")
            progress.update(task, total=steps)

        def on_progress(p) -> None:
            progress.update(task, completed=p.layers_done, rate=f"{p.tokens_per_second:,.0f} tokens/s")
        yield on_start, on_progress


def calibration_summary(console: Console, result) -> None:
    """Per calibrated tensor: the relative output error on the calibration tokens with error
    compensation and with importance-weighted rounding, the worst expert, and any fallback."""
    table = Table(title=f"output error ||(W - Q) X|| / ||W X|| on {result.tokens:,} calibration tokens",
                  caption="compensated: error-compensated rounding; rounding: importance-weighted rounding")
    for col in ("tensor", "type", "tokens", "compensated", "rounding", "ratio", "worst expert"):
        table.add_column(col, justify="left" if col in ("tensor", "type") else "right", no_wrap=True)
    for m in result.matrices:
        worst = "-"
        if m.worst_expert is not None:
            e, err, err_rounding = m.worst_expert
            worst = f"#{e} {err:.4f} ({err / err_rounding if err_rounding else 1:.2f})"
        table.add_row(m.name.removesuffix(".weight"), m.type.upper(), f"{m.tokens:,}", f"{m.error:.4f}",
                      f"{m.error_rounding:.4f}", f"{m.ratio:.2f}", worst)
    console.print(table)
    for m in result.matrices:
        if m.fallback:
            console.print(f"[yellow]fallback[/] {escape(m.name)}: importance-weighted rounding "
                          f"({escape(m.fallback)})")
    ratios = sorted(m.ratio for m in result.matrices)
    if ratios:
        fallbacks = sum(m.fallback is not None for m in result.matrices)
        console.print(f"compensated / rounding error: median {ratios[len(ratios) // 2]:.2f}, range "
                      f"{ratios[0]:.2f}-{ratios[-1]:.2f}; {fallbacks} of {len(ratios)} tensor(s) with a fallback")
    feed = FEED_WORDS[result.feeds]
    console.print(f"{result.tokens:,} tokens on {result.device} in {result.seconds:.1f} s; each layer fed {feed}")


FEED_WORDS = {   # nemoq.calib.walk.FEEDS
    "full-precision": "the full-precision outputs",
    "sequential": "the quantized layers' outputs (sequential)",
    "asymmetric": "the quantized layers' outputs, aimed at the full-precision ones (asymmetric)",
}


def conversion_summary(console: Console, result, fallbacks: list[tuple[str, str]]) -> None:
    by_type: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    for t in result.tensors:
        n = 1
        for d in t.shape:
            n *= d
        row = by_type[t.ggml_type]
        row[0] += 1
        row[1] += n
        row[2] += t.nbytes
    table = Table(title="written", show_footer=True)
    total_n = sum(r[1] for r in by_type.values())
    total_b = sum(r[2] for r in by_type.values())
    table.add_column("type", footer="total")
    table.add_column("tensors", justify="right", footer=str(len(result.tensors)))
    table.add_column("weights", justify="right", footer=f"{total_n:,}")
    table.add_column("size", justify="right", footer=human_bytes(total_b))
    table.add_column("bits/weight", justify="right", footer=f"{8 * total_b / max(total_n, 1):.2f}")
    for name, (count, n, b) in sorted(by_type.items()):
        table.add_row(name, str(count), f"{n:,}", human_bytes(b), f"{8 * b / max(n, 1):.2f}")
    console.print(table)
    rate = result.bytes_read / max(result.seconds, 1e-9)
    console.print(f"read {human_bytes(result.bytes_read)} in {result.seconds:.1f} s ({human_bytes(rate)}/s)")
    for f in fallbacks:
        console.print(f"[yellow]fallback[/]: {escape(f[0])}: {escape(f[1])}")
    if result.skipped:
        console.print(f"[yellow]skipped[/] {len(result.skipped)} multi-token-prediction tensor(s) "
                      f"(e.g. {result.skipped[0]}): llama.cpp's main model does not use them")
    for w in result.warnings:
        console.print(f"[yellow]warning[/]: {escape(w)}")
    for p in result.outputs:
        console.print(f"[green]wrote[/] {escape(str(p))}")


def _preview(value) -> str:
    if isinstance(value, str):
        one_line = value.replace("\n", "\\n")
        return one_line if len(one_line) <= STRING_PREVIEW else one_line[:STRING_PREVIEW] + f"... ({len(value)} chars)"
    if isinstance(value, list):
        head = ", ".join(_preview(v) for v in value[:ARRAY_PREVIEW])
        return f"[{head}{', ...' if len(value) > ARRAY_PREVIEW else ''}] ({len(value)})"
    return str(value)


def gguf_info(console: Console, contents, max_tensors: int = 0) -> None:
    files = ", ".join(str(f) for f in contents.files)
    console.print(f"[bold]{escape(files)}[/]: {len(contents.tensors)} tensors, {human_bytes(contents.total_bytes)}, "
                  f"{contents.n_elements:,} weights, {contents.bits_per_weight:.2f} bits/weight")
    meta = Table(title="metadata")
    meta.add_column("key")
    meta.add_column("value")
    for key, value in contents.metadata.items():
        meta.add_row(escape(key), escape(_preview(value)))
    console.print(meta)
    tensors = Table(title="tensors")
    for col in ("name", "shape (ne)", "type", "bytes"):
        tensors.add_column(col, justify="right" if col == "bytes" else "left", no_wrap=True)
    multi = len(contents.files) > 1
    if multi:
        tensors.add_column("file")
    shown = contents.tensors if max_tensors <= 0 else contents.tensors[:max_tensors]
    for t in shown:
        row = [t.name, " x ".join(map(str, t.shape)), t.type_name, f"{t.nbytes:,}"]
        tensors.add_row(*(row + [t.file.name] if multi else row))
    console.print(tensors)


def kernel_info(console: Console, status, formats, moe_formats=(), moe_row_dots: str | None = None) -> None:
    state = "[green]built[/]" if status.available else f"[yellow]unavailable[/] ({escape(status.message)})"
    console.print(f"C kernels: {state}")
    console.print(f"  library:  {escape(str(status.library))}")
    console.print(f"  compiler: {status.compiler} {escape(' '.join(status.flags))}")
    console.print(f"  formats:  {', '.join(formats)}")
    if moe_row_dots:   # the reference kernel: no command runs it (docs/kernels.md)
        console.print(f"  MoE reference matvec: {', '.join(moe_formats)} ({moe_row_dots})")


def cuda_info(console: Console, status, moe_formats, quant_formats) -> None:
    """nvcc, the two CUDA libraries (MoE reference matvec, quantizer) and the GPUs the CUDA runtime sees."""
    compiler = escape(status.nvcc) if status.nvcc else "[yellow]not found[/]"
    console.print(f"CUDA: nvcc {compiler}, GPUs: {status.devices}")
    if not status.devices:   # the message's last part says why the runtime (or nvidia-smi) sees none
        console.print(f"  [yellow]{escape(status.message.split('; ', 1)[-1])}[/]")
    rows = (("MoE reference matvec", status.built, status.message, status.library, moe_formats),
            ("quantizer", status.quantizer == "built", status.quantizer, status.quantizer_library, quant_formats))
    for name, built, message, library, formats in rows:
        state = "[green]built[/]" if built else f"[yellow]not built[/] ({escape(message)})"
        console.print(f"  {name}: {state}")
        if built:
            console.print(f"    library: {escape(str(library))}")
        console.print(f"    formats: {', '.join(formats)}")


def quant_plan(console: Console, typed, summary, recipe, table: bool = True, alternatives=()) -> None:
    if table:
        t = Table(title=f"{recipe.name}: {recipe.description}")
        for col in ("tensor", "shape (ne)", "type", "bytes", "why"):
            t.add_column(col, justify="right" if col == "bytes" else "left", no_wrap=col != "why")
        for x in typed:
            kind = x.type.upper() + (f" [yellow](wanted {x.wanted.upper()})[/]" if x.fell_back else "")
            t.add_row(x.spec.name, " x ".join(map(str, reversed(x.spec.shape))), kind, f"{x.nbytes:,}",
                      escape(x.fallback_why or x.reason))
        console.print(t)
    decimal = f" ({summary.total_bytes / 1e9:.2f} GB)" if summary.total_bytes >= 1e8 else ""   # as hubs list sizes
    console.print(f"[bold]{recipe.name}[/]: {summary.n_elements:,} weights, {human_bytes(summary.total_bytes)}"
                  f"{decimal}, [bold]{summary.bits_per_weight:.2f} bits per weight[/]")
    if summary.fallback_tensors:
        colour = "bold yellow" if summary.warn_fallbacks else "yellow"
        console.print(f"[{colour}]{summary.fallback_tensors} tensor(s) fell back to another type "
                      f"({100 * summary.fallback_share:.1f}% of the quantized weights): their rows are not a "
                      f"multiple of the wanted type's block[/]")
    if summary.warn_fallbacks:
        console.print(f"[bold yellow]{recipe.name}'s types would make {summary.wanted_bits_per_weight:.2f} bits "
                      f"per weight; with the fallbacks this file has {summary.bits_per_weight:.2f}.[/]")
        if alternatives:
            listed = ", ".join(f"{name} ({bpw:.2f} bpw)" for name, bpw in alternatives)
            console.print(f"[yellow]Recipes whose formats fit this model's widths: {listed}[/]")


def expert_coverage(console: Console, coverage, few_share: float, fallback: str) -> None:
    """Per MoE layer: tokens per routed expert, and the experts the imatrix barely or never saw."""
    if not coverage:
        return
    labels = " | ".join(label for label, _ in coverage[0].buckets)
    table = Table(title="calibration tokens per routed expert",
                  caption=f"histogram: experts with {labels} x mean tokens")
    for col in ("layer", "min", "median", "max", "histogram", "unseen", "few"):
        table.add_column(col, justify="left" if col == "layer" else "right", no_wrap=True, min_width=len(col))
    for layer in coverage:
        lo, mid, hi = layer.stats
        table.add_row(layer.tensor.rsplit(".", 2)[0], str(lo), f"{mid:g}", str(hi),
                      "|".join(str(n) for _, n in layer.buckets), _ids(layer.unseen), _ids(layer.few))
    console.print(table)
    unseen = sum(len(layer.unseen) for layer in coverage)
    if unseen:
        console.print(f"[yellow]{unseen} expert(s) saw no calibration token[/]: quantize uses the {fallback} "
                      "for them (more --tokens or other --data helps)")
    few = sum(len(layer.few) for layer in coverage)
    if few:
        console.print(f"{few} expert(s) saw under {few_share:g}x their layer's mean: their statistics are noisy")


def _ids(ids: tuple[int, ...], limit: int = 6) -> str:
    shown = ",".join(map(str, ids[:limit]))
    return shown + (f",+{len(ids) - limit}" if len(ids) > limit else "") if ids else "-"

"""`nemoq eval`: perplexity, KL divergence against a base model, the CI gate and its outputs."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ContextManager, Iterator

from nemoq.commands.extras import require

# (label, total) -> advance one step: one progress bar per scored file
Track = Callable[[str, int], Callable[[], None]]


@contextmanager
def no_tracks() -> Iterator[Track]:
    yield lambda label, total: lambda: None


@dataclass(frozen=True)
class EvalInputs:
    models: tuple[Path, ...]             # one, or several with --compare
    data: Path | None                    # UTF-8 text
    ctx: int = 512                       # tokens per chunk; the second half of each is scored
    chunks: int | None = None            # at most this many chunks


@dataclass(frozen=True)
class BaseOptions:
    """What the model is compared with."""
    model: Path | None = None            # --base: a GGUF run side by side
    logits: Path | None = None           # --base-logits: a --save-logits file instead
    save_logits: Path | None = None      # save the base's (or the model's own) top-k log-probs
    top_k: int = 256
    noise_floor: bool = False            # also the base against itself re-run
    noise_floor_model: Path | None = None


@dataclass(frozen=True)
class GateOptions:
    max_ppl_ratio: float | None = None
    max_kld: float | None = None
    min_top1: float | None = None
    baseline: Path | None = None         # a previous --json result not to fall behind
    tolerance: float = 2.0               # allowed worsening vs baseline, in combined standard errors

    @property
    def limits(self) -> dict[str, float | None]:
        return {"max_ppl_ratio": self.max_ppl_ratio, "max_kld": self.max_kld, "min_top1": self.min_top1}

    @property
    def has_limits(self) -> bool:
        return any(v is not None for v in self.limits.values())


@dataclass(frozen=True)
class EvalOptions:
    inputs: EvalInputs
    base: BaseOptions = BaseOptions()
    gate: GateOptions = GateOptions()
    compare: bool = False                # several models in one table against the base
    plot: Path | None = None             # with compare: bits per weight vs KLD as a PNG
    json_out: Path | None = None
    threads: int | None = None           # llama.cpp threads (None: all cores)
    force: bool = False                  # replace existing outputs
    llama_logs: bool = False             # show llama.cpp's own log lines


@dataclass
class EvalOutcome:
    record: dict                         # results.py's record, with "gates" and "passed" when gated
    checks: list = field(default_factory=list)      # gate.Check per limit and baseline comparison
    written: list[Path] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.record.get("passed", True)


def usage_error(opts: EvalOptions) -> str | None:
    """The first option combination that makes no sense, as the sentence to say, or None."""
    b, g, n = opts.base, opts.gate, len(opts.inputs.models)
    gated = g.has_limits or g.baseline is not None
    conflicts = (   # (wrong, what to say)
        (not opts.compare and n != 1, "give one model, or several with --compare"),
        (opts.inputs.data is None, "--data is required"),
        (b.model is not None and b.logits is not None, "--base and --base-logits exclude each other"),
        (b.logits is not None and b.save_logits is not None, "--save-logits needs a base model, not --base-logits"),
        (opts.compare and b.model is None, "--compare needs --base"),
        (opts.compare and (b.logits or b.save_logits or gated), "--compare takes no --base-logits, --save-logits or gate"),
        (opts.plot is not None and not opts.compare, "--plot goes with --compare"),
        ((b.noise_floor or b.noise_floor_model) and b.model is None, "--noise-floor needs --base"),
        (g.has_limits and b.model is None and b.logits is None,
         "--max-ppl-ratio, --max-kld and --min-top1 need --base or --base-logits"),
    )
    return next((message for wrong, message in conflicts if wrong), None)


def evaluate(opts: EvalOptions, tracks: Callable[[], ContextManager[Track]] = no_tracks) -> EvalOutcome:
    """Score, gate, and write the outputs (--plot, --save-logits, --json); `tracks()` is entered
    while the models run and gives each scored file's progress callback."""
    require("eval", "eval")
    from nemoq.eval import gate, results, run
    from nemoq.eval.model import LLAMA_LOGS
    from nemoq.eval.text import load_text
    from nemoq.files import claim_outputs
    LLAMA_LOGS.show = opts.llama_logs    # otherwise its lines land among the tables
    b, g = opts.base, opts.gate
    outputs = [p for p in (opts.json_out, b.save_logits, opts.plot) if p is not None]
    with claim_outputs(outputs, opts.force):   # before a long run: not written over, nor by two runs at once
        if opts.plot is not None:
            from nemoq.eval.plot import pyplot
            pyplot()                     # matplotlib missing: said now, not after the run
        run_opts = run.RunOptions(text=load_text(opts.inputs.data), data=opts.inputs.data, ctx=opts.inputs.ctx,
                                  chunks=opts.inputs.chunks, threads=opts.threads, top_k=b.top_k, force=opts.force)
        previous = results.read_baseline(g.baseline) if g.baseline is not None else None
        models = list(opts.inputs.models)
        checks = []
        with tracks() as track:
            if opts.compare:
                record = run.compare(models, b.model, run_opts, b.noise_floor_model, track=track)
            else:
                record = run.evaluate(models[0], run_opts, base=b.model, base_logits=b.logits,
                                      save_logits=b.save_logits, noise_floor=b.noise_floor,
                                      noise_floor_model=b.noise_floor_model, track=track)
        if opts.compare:
            if opts.plot is not None:
                from nemoq.eval.plot import plot_compare
                plot_compare(record, opts.plot, opts.force)
        else:
            checks = gate.check_limits(record, g.limits)
            if previous is not None:
                checks += gate.check_baseline(record, previous, g.baseline, g.tolerance)
            record = gate.with_gates(record, checks)
        if opts.json_out is not None:
            results.write_json(record, opts.json_out, opts.force)
    written = [p for p in (opts.plot if opts.compare else None, b.save_logits, opts.json_out) if p is not None]
    return EvalOutcome(record, checks, written)

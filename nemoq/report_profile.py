"""rich rendering of profiles and --target-size plans for the CLI."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from nemoq.report import human_bytes


def target_plan(console: Console, plan, table: bool = True) -> None:
    """Per tensor: the chosen type, its bytes and its share of the predicted KLD; then the file."""
    if table:
        t = Table(title=f"types for a budget of {plan.budget:,} bytes")
        for col in ("tensor", "type", "bytes", "KLD alone", "share"):
            t.add_column(col, justify="left" if col in ("tensor", "type") else "right", no_wrap=True)
        for name, type_name in plan.types.items():
            t.add_row(name, type_name.upper(), f"{plan.bytes_of[name]:,}", f"{plan.shares[name]:.6f}",
                      f"{plan.share(name):.1%}")
        console.print(t)
    counts: dict[str, int] = {}
    for type_name in plan.types.values():
        counts[type_name.upper()] = counts.get(type_name.upper(), 0) + 1
    mix = ", ".join(f"{n} {k}" for k, n in sorted(counts.items(), key=lambda kv: -kv[1]))
    if getattr(plan, "fit", None) is not None:
        fit_budget(console, plan.fit)
    console.print(f"file {plan.nbytes:,} bytes ({human_bytes(plan.nbytes)}) of a budget of {plan.budget:,}; "
                  f"predicted KLD {plan.kld:.5f}; types: {mix}", highlight=False, soft_wrap=True)


def fit_budget(console: Console, budget) -> None:
    """--fit: the memory, what llama.cpp needs beside the weights (quant.fit.TERMS), what is left."""
    fit = budget.fit
    t = Table(title=f"--fit {human_bytes(fit.memory)} at {fit.ctx:,} tokens",
              caption=f"llama.cpp: n_ctx {fit.n_ctx:,}, K/V {fit.kv_type}, n_ubatch {fit.ubatch}, flash attention "
                      f"{'on' if fit.flash_attn else 'off'}")
    t.add_column("", justify="left", no_wrap=True)
    t.add_column("bytes", justify="right", no_wrap=True)
    t.add_column("", justify="right", no_wrap=True)
    t.add_row("memory", f"{fit.memory:,}", human_bytes(fit.memory))
    for name, n in budget.needs:
        t.add_row(f"- {name}", f"{n:,}", human_bytes(n))
    t.add_row("= left for the file", f"{budget.weights:,}", human_bytes(budget.weights))
    console.print(t)


def profile_summary(console: Console, profile) -> None:
    """Per tensor: the measured one-tensor ablations (type: KLD) and the candidates' errors' range."""
    tokens = profile.calibration.get("tokens", 0)
    t = Table(title=f"profile: {len(profile.tensors)} tensors, {tokens:,} calibration tokens",
              caption=f"a file's KLD: s (sum of its tensors' KLD alone ^ (1/q)) ^ q, q = {profile.combine:.2f}, "
                      f"s = {profile.scale:.2f} (fitted on {len(profile.fits)} whole-model mixes)")
    for col in ("tensor", "candidates", "error range", "ablations (KLD)"):
        t.add_column(col, justify="left", no_wrap=True)
    for name, p in profile.tensors.items():
        errors = [p.error(k) for k in p.errors if k != "f16"]
        ablations = ", ".join(f"{k.upper()} {v:.5f}" for k, v in p.ablations.items())
        t.add_row(name, str(len(p.errors)), f"{min(errors):.4f}-{max(errors):.4f}" if errors else "-", ablations)
    console.print(t)

"""`quantize --plot F.png` with a budget: predicted file size vs predicted KLD, all from the same
profile. The allocator's frontier (the least predicted KLD at budgets from the smallest to the
largest file), the chosen file, and the fixed recipes, nemoq's and llama.cpp's, priced tensor by
tensor as the allocator prices its own choices (their types' bytes and KLD from the profile).

Sizes are the allocator's: each tensor's padded data, `.scale` companion and header entries plus
the fixed part (a recipe's real file differs only by its shorter `nemoq.recipe` string).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from nemoq.calib.profile import Profile
from nemoq.calib.target import TargetPlan, fixed_bytes, options_of
from nemoq.convert.pipeline import Source
from nemoq.files import atomic_outputs
from nemoq.quant.allocate import allocate, largest_size, smallest_size
from nemoq.quant.recipes import RECIPES, plan_types

FRONTIER_POINTS = 32
# (family, marker, recipes) in legend order
RECIPE_FAMILIES = (
    ("nemoq", "s", ("NQ4", "NQ5")),
    ("llama.cpp", "^", ("Q4_K_M", "Q5_K_M", "Q6_K", "IQ4_NL", "MXFP4_MOE", "Q8_0")),
)


@dataclass
class PlotData:
    frontier: list[tuple[int, float]]                 # (file bytes, predicted KLD) per budget
    chosen: tuple[int, float]
    budget: int
    recipes: dict[str, tuple[str, int, float]] = field(default_factory=dict)   # name -> (family, bytes, KLD)
    unpriced: list[str] = field(default_factory=list)   # recipes with a type the profile has no error for


def plot_data(profile: Profile, source: Source, plan: TargetPlan, *, compensated: bool = False,
              tensor_scales: bool = True, calibrated: bool = False) -> PlotData:
    options = options_of(profile, source, compensated, tensor_scales)
    fixed = fixed_bytes(source, profile, options, tensor_scales, calibrated)
    lo, hi = smallest_size(options, fixed), largest_size(options, fixed)
    kld = profile.kld_of_cost           # the allocator sums the tensors' k^(1/q)
    frontier = []
    for i in range(FRONTIER_POINTS):
        a = allocate(options, lo + (hi - lo) * i // (FRONTIER_POINTS - 1), fixed)
        frontier.append((a.nbytes, kld(a.kld)))
    data = PlotData(frontier, (plan.nbytes, plan.kld), plan.budget)
    specs = [t.spec for t in source.plan.tensors]
    for family, _, names in RECIPE_FAMILIES:
        for name in names:
            typed = plan_types(specs, RECIPES[name], source.layer_kinds, (), tensor_scales)
            chosen = {t.spec.name: next((c for c in options[t.spec.name] if c.type == t.type), None)
                      for t in typed if t.spec.name in options}
            if any(c is None for c in chosen.values()):
                data.unpriced.append(name)
                continue
            size = fixed + sum(c.nbytes for c in chosen.values())
            data.recipes[name] = (family, size, kld(sum(c.kld for c in chosen.values())))
    return data


def draw(data: PlotData, out: Path, force: bool) -> None:
    """The PNG, written atomically (an existing file only with force)."""
    from nemoq.eval.plot import pyplot
    plt = pyplot()
    every = [b for b, _ in data.frontier] + [b for _, b, _ in data.recipes.values()] + [data.budget]
    unit, scale = ("GB", 1e9) if max(every) >= 1e9 else ("MB", 1e6)
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    xs, ys = zip(*sorted(data.frontier))
    # steps: between two budgets the least KLD is at most the smaller budget's
    ax.plot([x / scale for x in xs], ys, "-", drawstyle="steps-post", color="tab:blue",
            label="nemoq allocator (frontier)")
    ax.axvline(data.budget / scale, color="gray", linestyle="--", linewidth=1, label="budget")
    ax.plot(data.chosen[0] / scale, data.chosen[1], "*", color="tab:red", markersize=14, label="chosen file")
    colors = {"nemoq": "tab:green", "llama.cpp": "tab:orange"}
    for family, marker, _ in RECIPE_FAMILIES:
        points = {n: (b, k) for n, (f, b, k) in data.recipes.items() if f == family}
        if not points:
            continue
        ax.plot([b / scale for b, _ in points.values()], [k for _, k in points.values()], marker, linestyle="",
                color=colors[family], label=f"{family} recipes")
        for name, (b, k) in points.items():
            ax.annotate(name, (b / scale, k), textcoords="offset points", xytext=(4, 4), fontsize=7)
    if all(k > 0 for k in ys) and all(k > 0 for _, _, k in data.recipes.values()):
        ax.set_yscale("log")
    ax.set_xlabel(f"file size ({unit})")
    ax.set_ylabel("predicted KLD (nats)")
    ax.set_title("predicted size vs KLD, from the profile")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        with atomic_outputs(out, force) as tmp:
            fig.savefig(tmp, format="png", dpi=120)
    finally:
        plt.close(fig)


def plot_target(source: Source, profile: Profile, plan: TargetPlan, out: Path, *, force: bool = False,
                compensated: bool = False, tensor_scales: bool = True) -> PlotData:
    data = plot_data(profile, source, plan, compensated=compensated, tensor_scales=tensor_scales,
                     calibrated=compensated)
    draw(data, out, force)
    return data

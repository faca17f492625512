"""bits per weight vs KLD, one labelled point per model (matplotlib: the nemoq[plot] extra)."""

from __future__ import annotations

from pathlib import Path

from nemoq.errors import NemoqError
from nemoq.files import atomic_outputs


def pyplot():
    """matplotlib's pyplot without a display, or a clear error (checked before a long run)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise NemoqError("--plot needs matplotlib: pip install 'nemoq[plot]'") from None
    return plt


def plot_compare(record: dict, out: Path, force: bool) -> None:
    plt = pyplot()
    rows = record["models"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for row in rows:
        bpw, kld = row["model"]["bits_per_weight"], row["kld"]["kld_mean"]
        ax.errorbar(bpw, kld, yerr=row["kld"]["kld_stderr"], fmt="o", color="tab:blue")
        ax.annotate(Path(row["model"]["path"]).stem, (bpw, kld), textcoords="offset points", xytext=(5, 5), fontsize=8)
    if any(r["kld"]["kld_mean"] <= 0 for r in rows):
        ax.set_yscale("symlog", linthresh=1e-4)
    else:
        ax.set_yscale("log")
    ax.set_xlabel("bits per weight")
    ax.set_ylabel("mean KLD vs base (nats)")
    ax.set_title(f"KLD vs size, base {Path(record['base']['path']).name}")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    with atomic_outputs(out, force) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)

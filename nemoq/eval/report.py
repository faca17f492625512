"""rich tables for `nemoq eval`: the numbers of one run, the gate, and --compare."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from nemoq.report import human_bytes


def _pm(value: float, err: float, digits: int = 4) -> str:
    return f"{value:.{digits}f} ± {err:.{digits}f}"


def _data_line(data: dict) -> str:
    return (f"{data['chunks']} chunks of {data['ctx']} tokens, {data['scored_tokens']} scored "
            f"(second half of each chunk), text of {data['tokens']} tokens")


# (label, format) for the KLD section, in llama-perplexity's order
KLD_ROWS = (
    ("PPL(base)", lambda k: _pm(k["base_ppl"], k["base_ppl_stderr"])),
    ("PPL(model) / PPL(base)", lambda k: _pm(k["ppl_ratio"], k["ppl_ratio_stderr"], 5)),
    ("PPL(model) - PPL(base)", lambda k: _pm(k["ppl_diff"], k["ppl_diff_stderr"])),
    ("KLD mean", lambda k: _pm(k["kld_mean"], k["kld_stderr"], 6)),
    ("KLD median", lambda k: f"{k['kld_median']:.6f}"),
    ("KLD 99%", lambda k: f"{k['kld_p99']:.6f}"),
    ("KLD max", lambda k: f"{k['kld_max']:.6f}"),
    ("same top-1", lambda k: f"{100 * k['top1']:.3f} ± {100 * k['top1_stderr']:.3f} %"),
)


def eval_summary(console: Console, record: dict) -> None:
    model, kld, base = record["model"], record["kld"], record["base"]
    console.print(f"[bold]{escape(model['path'])}[/]: {_data_line(record['data'])}")
    table = Table(show_header=False)
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("PPL(model)", _pm(model["ppl"], model["ppl_stderr"]))
    if kld is not None:
        for label, fmt in KLD_ROWS:
            table.add_row(label, fmt(kld))
    console.print(table)
    if base is not None and base["source"] == "logits-file":
        console.print(f"[yellow]KLD from a top-{base['top_k']} logits file[/] ({escape(base['path'])}): tokens outside "
                      f"the base's top {base['top_k']} ({100 * base['tail_mass']:.2f}% of its probability on average) "
                      "are lumped into one bucket, which underestimates KLD (docs/eval.md)")
    noise_floor(console, record["noise_floor"])


def noise_floor(console: Console, rows: list[dict]) -> None:
    if not rows:
        return
    table = Table(title="noise floor (KLD that is not a regression)")
    for col in ("against the base", "KLD mean", "KLD 99%", "KLD max", "same top-1"):
        table.add_column(col, justify="left" if col.startswith("against") else "right")
    for r in rows:
        table.add_row(f"{r['label']}: {escape(Path(r['path']).name)}", _pm(r["kld_mean"], r["kld_stderr"], 6),
                      f"{r['kld_p99']:.6f}", f"{r['kld_max']:.6f}", f"{100 * r['top1']:.3f} %")
    console.print(table)


def gate_table(console: Console, checks) -> None:
    table = Table(title="gate")
    for col in ("check", "value", "limit", "result"):
        table.add_column(col, justify="left" if col == "check" else "right")
    for c in checks:
        verdict = "[green]pass[/]" if c.passed else "[bold red]FAIL[/]"
        table.add_row(c.name, f"{c.value:.6g}", f"{c.rule} {c.limit:.6g}", verdict)
    console.print(table)


def compare_table(console: Console, record: dict) -> None:
    base = record["base"]
    console.print(f"base [bold]{escape(base['path'])}[/]: PPL {_pm(base['ppl'], base['ppl_stderr'])}; "
                  f"{_data_line(record['data'])}")
    table = Table(title="models against the base")
    table.add_column("file", overflow="fold")
    for col in ("size", "bpw", "PPL", "KLD mean", "KLD 99%", "top-1"):
        table.add_column(col, justify="right", no_wrap=True)
    for row in record["models"]:
        m, k = row["model"], row["kld"]
        table.add_row(escape(Path(m["path"]).name), human_bytes(m["size_bytes"]), f"{m['bits_per_weight']:.2f}",
                      f"{m['ppl']:.4f}", f"{k['kld_mean']:.6f}", f"{k['kld_p99']:.5f}", f"{100 * k['top1']:.2f}%")
    console.print(table)
    noise_floor(console, record["noise_floor"])

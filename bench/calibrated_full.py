"""Time and memory of `quantize --calibrate` at real widths: the full-width synthetic checkpoint.

    .venv/bin/python bench/calibrated_full.py [--recipe Q4_K_M] [--tokens 8192] [--ctx 512]
        [--calibrate-json FILE] [--json FILE]
    .venv/bin/python bench/calibrated_full.py --matrices [--formats iq4_nl q4_k] [--reference]
    .venv/bin/python bench/calibrated_full.py --layers [--format iq4_nl]

The first form runs `quantize --calibrate` on the checkpoint of bench/calibrate.py (pattern ME*:
one Mamba, one MoE and one attention layer at Nemotron 3 Nano's widths) as a child process and
reports wall and CPU seconds per step of the walk (each layer, then the output head), peak RSS
(/usr/bin/time), the ratio to `nemoq calibrate` on the same tokens (bench/calibrate.py's JSON,
or run here), and the 52-layer model projected from the steps (23 Mamba, 23 MoE, 6 attention
layers and the head). CPU seconds are the fairer figure on a shared machine: wall time there
is mostly waiting for a core.

--layers: the fast path's seconds for every matrix of each Nano layer kind (compensation only,
no forward), summed per layer and projected to the 52 layers.

--matrices: seconds per Nano expert matrix (1856 x 2688 and 2688 x 1856, 384 tokens: 8192 x 6
routed over 128 experts), fast path per format, and with --reference the numpy reference too.
Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

from measure import git_state, spawn_timed, warm  # noqa: E402
from synthetic import ensure_checkpoint, shards_of  # noqa: E402

RSS_TARGET = 8e9
NANO_LAYERS = {"mamba": 23, "moe": 23, "attention": 6}   # Nemotron 3 Nano's 52 layers
EXPERT_SHAPES = ((1856, 2688), (2688, 1856))              # up (rows, n), down
EXPERT_TOKENS = 384
# --layers: each matrix of a Nano layer as (layer kind, name, rows, n, tokens reaching it, copies
# per layer); the head's 131072 rows are timed on CHUNK_ROWS and scaled (rows are independent)
NANO_MATRICES = (
    ("moe", "ffn_up_exps (one expert)", 1856, 2688, 384, 128),
    ("moe", "ffn_down_exps (one expert)", 2688, 1856, 384, 128),
    ("moe", "ffn_up_shexp", 3712, 2688, 8192, 1),
    ("moe", "ffn_down_shexp", 2688, 3712, 8192, 1),
    ("mamba", "ssm_in", 10304, 2688, 8192, 1),
    ("mamba", "ssm_out", 2688, 4096, 8192, 1),
    ("attention", "attn_q", 4096, 2688, 8192, 1),
    ("attention", "attn_k / attn_v", 256, 2688, 8192, 2),
    ("attention", "attn_output", 2688, 4096, 8192, 1),
    ("head", "output", 131072, 2688, 8192, 1),
)
CHUNK_ROWS = 4096


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pattern", default="ME*")
    ap.add_argument("--cache-dir", type=Path, default=ROOT / "bench" / ".cache")
    ap.add_argument("--recipe", default="Q4_K_M")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=2,
                    help="torch and C-kernel threads of the timed code (1: CPU seconds are the work done; "
                         "with more, waiting threads spin and count on a shared machine)")
    ap.add_argument("--calibrate-json", type=Path, help="bench/calibrate.py's figures for the same tokens")
    ap.add_argument("--json", type=Path, help="write the figures to this file")
    ap.add_argument("--matrices", action="store_true", help="time single expert matrices instead")
    ap.add_argument("--layers", action="store_true", help="time every matrix kind of a Nano layer instead")
    ap.add_argument("--format", default="iq4_nl", help="with --layers: the format every matrix is rounded to")
    ap.add_argument("--formats", nargs="+", default=None)
    ap.add_argument("--reference", action="store_true", help="with --matrices: time the numpy reference too")
    ap.add_argument("--child", nargs=2, metavar=("SRC", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    figures = matrices(args) if args.matrices else layer_costs(args) if args.layers else full(args)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


def full(args) -> dict:
    src = ensure_checkpoint(args.cache_dir, args.pattern)
    scratch = args.cache_dir / "scratch"
    scratch.mkdir(parents=True, exist_ok=True)
    out, log = scratch / "calibrated.gguf", scratch / "calibrated.log"
    warm(shards_of(src))
    argv = [sys.executable, __file__, "--child", str(src), str(out), "--recipe", args.recipe, "--tokens",
            str(args.tokens), "--ctx", str(args.ctx), "--device", args.device, "--threads", str(args.threads)]
    seconds, rss, code, cpu = spawn_timed(argv, log)
    if code != 0:
        raise SystemExit(f"quantize --calibrate failed ({code}):\n{log.read_text()[-3000:]}")
    steps = [json.loads(line[5:]) for line in log.read_text().splitlines() if line.startswith("step ")]
    base = calibrate_figures(args, src)
    cpu_s = cpu["child_cores"] * seconds
    base_cpu = base["cpu"]["child_cores"] * base["seconds"]
    per_kind: dict[str, list] = {}
    for s in steps:
        per_kind.setdefault(s["kind"], []).append(s)
    projected = {m: sum(NANO_LAYERS.get(k, 1) * sum(s[m] for s in v) / len(v) for k, v in per_kind.items())
                 for m in ("wall_s", "cpu_s")}
    figures = {"pattern": args.pattern, "recipe": args.recipe, "tokens": args.tokens // args.ctx * args.ctx,
               "threads": args.threads, "seconds": round(seconds, 1), "cpu_seconds": round(cpu_s, 1),
               "peak_rss_gb": round(rss / 1e9, 2), "rss_target_gb": RSS_TARGET / 1e9, "cpu": cpu, "steps": steps,
               "calibrate": {"seconds": base["seconds"], "cpu_seconds": round(base_cpu, 1),
                             "peak_rss_gb": base["peak_rss_gb"]},
               "ratio_wall": round(seconds / base["seconds"], 2), "ratio_cpu": round(cpu_s / base_cpu, 2),
               "projected_52_layers": {k: round(v) for k, v in projected.items()}, "code": git_state()}
    print(f"{'step':<14}{'kind':<11}{'wall s':>8}{'cpu s':>8}")
    for s in steps:
        print(f"{s['step']:<14}{s['kind']:<11}{s['wall_s']:>8.1f}{s['cpu_s']:>8.1f}")
    print(f"--calibrate {seconds:.1f} s wall, {cpu_s:.1f} cpu s, peak RSS {rss / 1e9:.2f} GB "
          f"({'ok' if rss <= RSS_TARGET else 'OVER'} <= 8 GB); calibrate {base['seconds']} s wall, "
          f"{base_cpu:.1f} cpu s: ratio {figures['ratio_wall']} wall, {figures['ratio_cpu']} cpu")
    print(f"52 layers projected: {projected['wall_s'] / 60:.0f} min wall, {projected['cpu_s'] / 60:.0f} cpu min")
    return figures


def calibrate_figures(args, src: Path) -> dict:
    if args.calibrate_json:
        return json.loads(args.calibrate_json.read_text())
    import subprocess
    scratch = args.cache_dir / "scratch" / "calibrate.json"
    subprocess.run([sys.executable, str(ROOT / "bench" / "calibrate.py"), "--pattern", args.pattern, "--cache-dir",
                    str(args.cache_dir), "--tokens", str(args.tokens), "--ctx", str(args.ctx), "--device",
                    args.device, "--json", str(scratch)], check=True)
    return json.loads(scratch.read_text())


def child(args) -> None:
    """The timed run: quantize --calibrate through the library, one JSON line per walk step."""
    import torch

    from nemoq.calib.calibrated import quantize_calibrated
    from nemoq.quant.recipes import RECIPES
    torch.set_num_threads(args.threads)
    src, out = (Path(p) for p in args.child)
    kinds = json.loads((src / "config.json").read_text())["hybrid_override_pattern"]
    names = {"M": "mamba", "E": "moe", "*": "attention"}
    last = [time.perf_counter(), time.process_time()]

    def progress(p) -> None:
        now = [time.perf_counter(), time.process_time()]
        step = p.layers_done - 1
        kind = names[kinds[step]] if step < len(kinds) else "head"
        print("step " + json.dumps({"step": f"{step + 1}/{p.layers}", "kind": kind,
                                    "wall_s": round(now[0] - last[0], 1), "cpu_s": round(now[1] - last[1], 1)}),
              flush=True)
        last[:] = now

    r = quantize_calibrated(src, out, RECIPES[args.recipe], tokens=args.tokens, ctx=args.ctx, device=args.device,
                            force=True, on_progress=progress)
    for m in r.matrices:
        print(f"{m.name:<28}{m.type:<8}{m.error:.4f} vs {m.error_rounding:.4f}  {m.fallback or ''}")


def matrices(args) -> dict:
    """Seconds per Nano expert matrix, fast path (and reference), each format."""
    import numpy as np
    import torch
    from threadpoolctl import threadpool_limits

    from nemoq import kernels_c
    from nemoq.calib import compensate_torch
    from nemoq.quant import compensate
    from nemoq.quant.formats import FORMATS
    torch.set_num_threads(args.threads)
    kernels_c.THREADS = args.threads
    rng = np.random.default_rng(0)
    figures = []
    for rows, n in EXPERT_SHAPES:
        h, x = statistics(rng, n, EXPERT_TOKENS)
        w = (rng.standard_normal((rows, n)) * 0.02).astype(np.float32)
        for fmt in args.formats or list(FORMATS):
            if n % FORMATS[fmt].block_size:
                continue
            order = compensate.column_order(fmt)   # the walk's column order for the format
            runs = {"fast": lambda: compensate_torch.compensated_quantize(
                fmt, w, h, tokens=EXPERT_TOKENS, inputs=x, act_order=order)}
            if args.reference:
                runs["reference"] = lambda: compensate.compensated_quantize(
                    fmt, w, h, tokens=EXPERT_TOKENS, act_order=order)
            row = {"shape": [rows, n], "format": fmt, "act_order": order}
            for name, run in runs.items():
                with threadpool_limits(1, user_api="blas"):
                    t, c = time.perf_counter(), time.process_time()
                    result = run()
                    row[name] = {"wall_s": round(time.perf_counter() - t, 2),
                                 "cpu_s": round(time.process_time() - c, 2),
                                 "error": round(result.error, 5), "error_rounding": round(result.error_rounding, 5)}
            print(json.dumps(row), flush=True)
            figures.append(row)
    return {"tokens": EXPERT_TOKENS, "threads": args.threads, "matrices": figures, "code": git_state()}


def statistics(rng, n: int, tokens: int):
    """(H float64 (n, n), the tokens or None) of a synthetic matrix input: an expert's own tokens
    (fewer than half the columns), else a well-conditioned H (any of its width costs the same)."""
    import numpy as np
    import torch
    if tokens < n / 2:
        x = (rng.standard_normal((tokens, n)) @ (rng.standard_normal((n, n)) / np.sqrt(n))).astype(np.float32)
        return (x.T @ x).astype(np.float64), x
    b = torch.randn(n, 256, generator=torch.Generator().manual_seed(0))
    return (b @ b.T / 256 + torch.eye(n)).double().numpy(), None


def layer_costs(args) -> dict:
    """The fast path's seconds for every matrix of each Nano layer kind (synthetic weights and H,
    the walk's arguments: the tokens of an expert handed in), summed per layer and projected."""
    import numpy as np
    import torch
    from threadpoolctl import threadpool_limits

    from nemoq import kernels_c
    from nemoq.calib import compensate_torch
    from nemoq.quant import compensate
    torch.set_num_threads(args.threads)
    kernels_c.THREADS = args.threads
    rng = np.random.default_rng(0)
    rows_out, per_kind = [], {}
    for kind, name, rows, n, tokens, copies in NANO_MATRICES:
        timed = min(rows, CHUNK_ROWS)
        h, inputs = statistics(rng, n, tokens)
        w = (rng.standard_normal((timed, n)) * 0.02).astype(np.float32)
        with threadpool_limits(1, user_api="blas"):
            t, c = time.perf_counter(), time.process_time()
            result = compensate_torch.compensated_quantize(args.format, w, h, tokens=tokens, inputs=inputs,
                                                           act_order=compensate.column_order(args.format))
            wall, cpu = time.perf_counter() - t, time.process_time() - c
        scale = copies * rows / timed
        row = {"kind": kind, "matrix": name, "shape": [rows, n], "tokens": tokens, "copies": copies,
               "timed_rows": timed, "wall_s": round(wall, 2), "cpu_s": round(cpu, 2),
               "layer_wall_s": round(wall * scale, 1), "layer_cpu_s": round(cpu * scale, 1),
               "error": round(result.error, 4), "error_rounding": round(result.error_rounding, 4)}
        print(json.dumps(row), flush=True)
        rows_out.append(row)
        kind_sums = per_kind.setdefault(kind, {"wall_s": 0.0, "cpu_s": 0.0})
        kind_sums["wall_s"] += row["layer_wall_s"]
        kind_sums["cpu_s"] += row["layer_cpu_s"]
    projected = {m: round(sum(NANO_LAYERS.get(k, 1) * v[m] for k, v in per_kind.items())) for m in ("wall_s", "cpu_s")}
    print("per layer:", json.dumps(per_kind), "52 layers:", json.dumps(projected))
    return {"format": args.format, "threads": args.threads, "matrices": rows_out, "per_layer": per_kind,
            "projected_52_layers": projected, "code": git_state()}


if __name__ == "__main__":
    main()

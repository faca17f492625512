"""What `nemoq profile` costs at Nemotron 3 Nano's real widths, projected to the 52-layer model.

    .venv/bin/python bench/profile_full.py [--dense-rows 1024] [--kinds moe mamba attention head] [--json FILE]
    .venv/bin/python bench/profile_full.py --ablations

The walk part: ProfileWalk.quantize_matrix hands every matrix to type_errors.matrix_errors with
all its candidate types; here each matrix kind of a Nano layer (bench/calibrated_full.py's
NANO_MATRICES: one routed expert up and down with H from its 384 tokens, the dense matrices with
a dense H) is timed as the walk calls it, compensated=False and compensated=True, in CPU seconds
of one thread. Rows are independent, so dense matrices are timed on --dense-rows rows and scaled
(this over-counts H's Cholesky factor, once per type per matrix). Each figure is split into the
per-block rounding (plain_values, timed alone; with compensation, what is not products) and the
products, counted in FLOPs from the code, so a GPU's share can be projected: products at
GPU_FLOPS, the per-block searches kept as CPU seconds (a projection, not a measurement).

--ablations: the one-tensor ablations a Nano profile runs, counted from the real config.json,
with the bytes each would take as an F32 file (as they were measured before ablations.py).

--streams: the ablations as ablations.py measures them, streams of the layer-streamed forward,
timed on the full-width `ME*` checkpoint (one Mamba, one MoE, one attention layer at Nano's
widths): CPU seconds of one thread per stream and layer kind, per stream at the head, and per
tensor rounded; projected to a Nano profile (its 492 ablations on --tokens tokens and its fit
mixes on FIT_TOKENS, with the passes STREAM_BYTES allows). Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from functools import partial
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

from calibrated_full import NANO_LAYERS, NANO_MATRICES, statistics  # noqa: E402
from measure import git_state  # noqa: E402

NANO_CONFIG = ROOT / "tests" / "data" / "nemotron-3-nano"   # the published config.json
GPU_FLOPS = 50e12          # H100 SXM, dense float32 (TF32 off) order of magnitude; float64 tensor ~60e12
PASSES_PRODUCTS = 8        # compensated, per type: sweep r n^2 (triangular), 2 descent passes 2 x 2 r n^2,
                           # three output forms through the triangular factor 3 r n^2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dense-rows", type=int, default=1024, help="rows timed of a dense matrix (then scaled)")
    ap.add_argument("--kinds", nargs="+", default=["moe", "mamba", "attention", "head"])
    ap.add_argument("--no-compensated", action="store_true", help="time plain errors only")
    ap.add_argument("--ablations", action="store_true", help="count a Nano profile's ablations instead")
    ap.add_argument("--memory", action="store_true", help="numpy's peak in matrix_errors (plain) on the head instead")
    ap.add_argument("--streams", action="store_true", help="time the streamed ablations on the ME* checkpoint")
    ap.add_argument("--tokens", type=int, default=1024, help="with --streams: tokens per ablation")
    ap.add_argument("--cache-dir", type=Path, default=ROOT / "bench" / ".cache")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    figures = (ablations() if args.ablations else head_memory(args) if args.memory else
               streamed(args) if args.streams else walk(args))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


def flops(rows: int, n: int, types: tuple[str, ...], compensated: bool, tokens: int) -> float:
    """Products of matrix_errors: tr(W H W^T) and one tr(D H D^T) per type (float64, numpy; through
    an expert's tokens, 2 r n t each, where fewer than n / 2); with compensation per quantized type
    H's Cholesky n^3/3 and ~PASSES_PRODUCTS r n^2 (the fast path)."""
    plain = 2.0 * rows * n * min(n, tokens) * (1 + len(types)) if tokens < n / 2 else \
        2.0 * rows * n * n * (1 + len(types))
    if not compensated:
        return plain
    quantized = [t for t in types if t != "f16"]
    return plain + 2.0 * rows * n * n + len(quantized) * (n ** 3 / 3 + PASSES_PRODUCTS * rows * n * n)


def cpu(run) -> float:
    c = time.process_time()
    run()
    return time.process_time() - c


def walk(args) -> dict:
    import numpy as np
    import torch
    from threadpoolctl import threadpool_limits

    from nemoq import kernels_c
    from nemoq.calib import compensate_torch
    from nemoq.calib.profile import candidate_types
    from nemoq.quant.tensor_scale import SCALE_RULES
    from nemoq.quant.type_errors import matrix_errors, plain_values
    torch.set_num_threads(1)
    kernels_c.THREADS = 1
    quantize = partial(compensate_torch.compensated_quantize, device="cpu")   # as ProfileWalk._compensate
    rng = np.random.default_rng(0)
    rows_out = []
    with threadpool_limits(1, user_api="blas"):
        rate = product_rate(np)
        for kind, name, rows, n, tokens, copies in NANO_MATRICES:
            if kind not in args.kinds:
                continue
            expert = tokens < n / 2
            timed = rows if expert else min(rows, args.dense_rows)
            h, x = statistics(rng, n, tokens)   # x: an expert's tokens (its errors go through them)
            w = (rng.standard_normal((timed, n)) * 0.02).astype(np.float32)
            types = candidate_types(SimpleNamespace(row_width=n))
            scaled = {t: t in SCALE_RULES and kind != "head" for t in types}   # no output.scale (takes_scale)
            row = {"kind": kind, "matrix": name, "shape": [rows, n], "tokens": tokens, "copies": copies,
                   "timed_rows": timed, "types": list(types),
                   "rounding_cpu_s": round(cpu(lambda: [plain_values(t, w, scaled[t]) for t in types]), 2)}
            for comp in (False, True)[:1 if args.no_compensated else 2]:
                key = "compensated" if comp else "plain"
                row[key + "_cpu_s"] = round(cpu(lambda: matrix_errors(
                    w, h, types, tokens=tokens, scaled=scaled, compensated=comp, quantize=quantize, inputs=x)), 2)
                row[key + "_gflop"] = round(flops(timed, n, types, comp, tokens) / 1e9, 1)
            project(row, rate)
            print(json.dumps(row), flush=True)
            rows_out.append(row)
    return {"threads": 1, "product_gflops_cpu": rate, "gpu_flops": GPU_FLOPS, "matrices": rows_out,
            "projected_52_layers": total(rows_out), "code": git_state()}


def product_rate(np) -> dict:
    """One core's GFLOP/s on a product of the walk's shape (1024 x 2688 by 2688 x 2688)."""
    out = {}
    for dtype in ("float64", "float32"):
        a, b = np.ones((1024, 2688), dtype), np.ones((2688, 2688), dtype)
        out[dtype] = round(2 * 1024 * 2688 ** 2 / cpu(lambda: a @ b) / 1e9, 1)
    return out


def project(row: dict, rate: dict) -> None:
    """Per Nano layer (copies x rows / timed rows): CPU seconds, and a GPU projection that keeps
    the per-block work (measured CPU seconds less the products at one core's measured rate)."""
    scale = row["copies"] * row["shape"][0] / row["timed_rows"]
    for key in ("plain", "compensated"):
        if key + "_cpu_s" not in row:
            continue
        total_s, products = row[key + "_cpu_s"], row[key + "_gflop"] * 1e9
        plain = row["plain_gflop"] * 1e9     # numpy float64; the compensated rest torch float32
        on_cpu = plain / (rate["float64"] * 1e9) + (products - plain) / (rate["float32"] * 1e9)
        per_block = max(row["rounding_cpu_s"], total_s - on_cpu)
        row[key + "_layer_cpu_s"] = round(total_s * scale, 1)
        row[key + "_layer_gpu_s"] = round((per_block + products / GPU_FLOPS) * scale, 1)


def total(rows: list[dict]) -> dict:
    """The 52-layer walk: each kind's per-layer sum x its layers; the head once, and the
    embeddings (plain rounding per type, no H) counted as the head's rounding."""
    out = {}
    for key in ("plain_layer_cpu_s", "plain_layer_gpu_s", "compensated_layer_cpu_s", "compensated_layer_gpu_s"):
        s = sum(NANO_LAYERS.get(r["kind"], 1) * r[key] for r in rows if key in r)
        head = [r for r in rows if r["kind"] == "head"]
        if head:
            s += head[0]["rounding_cpu_s"] * head[0]["shape"][0] / head[0]["timed_rows"]
        out[key.replace("_layer", "")] = round(s)
    return out


def head_memory(args) -> dict:
    """numpy's peak allocation (tracemalloc) in matrix_errors of the output head, plain, beside its
    weights, at --dense-rows rows and at 4x as many; projected to its 131072 rows along the line
    through the two (H's products go ROWS rows at a time: what grows is the float32 rounding of
    each type, the size of the weights)."""
    import tracemalloc

    import numpy as np

    from nemoq.calib.profile import candidate_types
    from nemoq.quant.type_errors import matrix_errors
    kind, name, rows, n, tokens, _ = next(m for m in NANO_MATRICES if m[0] == "head")
    h, _ = statistics(np.random.default_rng(0), n, tokens)
    types = candidate_types(SimpleNamespace(row_width=n))
    peaks = {}
    for timed in (args.dense_rows, 4 * args.dense_rows):
        w = (np.random.default_rng(1).standard_normal((timed, n)) * 0.02).astype(np.float32)
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        matrix_errors(w, h, types, tokens=tokens, scaled={}, compensated=False)
        peaks[timed] = tracemalloc.get_traced_memory()[1] - base
        tracemalloc.stop()
    (r0, p0), (r1, p1) = peaks.items()
    full = p0 + (p1 - p0) / (r1 - r0) * (rows - r0)
    figures = {"matrix": name, "peaks_gb": {r: round(p / 1e9, 3) for r, p in peaks.items()},
               "weights_gb_full": round(rows * n * 4 / 1e9, 2), "full_peak_gb": round(full / 1e9, 2)}
    print(json.dumps(figures))
    return figures


def ablations() -> dict:
    """A Nano profile's llama.cpp runs and the F32 bytes each writes (sensitivity.mix_klds)."""
    import numpy as np

    from nemoq.calib.profile import FIT_MIXES, FIT_TOKENS, candidate_types
    from nemoq.calib.sensitivity import DEFAULT_TOKENS
    from nemoq.convert.config import load_config
    from nemoq.convert.plan import tensor_specs
    from nemoq.quant.recipes import stays_f32
    specs = tensor_specs(load_config(NANO_CONFIG))
    profiled = [s for s in specs if not stays_f32(s)]
    runs = sum(min(3, len([t for t in candidate_types(s) if t != "f16"])) for s in profiled)   # ablation_types
    f32_bytes = 4 * sum(int(np.prod(s.shape)) for s in specs)
    figures = {"tensors": len(specs), "profiled": len(profiled), "ablations": runs, "fit_mixes": FIT_MIXES,
               "f32_file_gb": round(f32_bytes / 1e9, 1), "ablation_tokens": DEFAULT_TOKENS, "fit_tokens": FIT_TOKENS,
               "written_tb": round((runs + 1) * f32_bytes / 1e12, 1)}
    print(json.dumps(figures))
    return figures


def streamed(args) -> dict:
    """ablations.StreamedKLD on the ME* checkpoint, one thread: every profiled tensor ablated in
    its most-error type among those of a Nano profile's ablations (the rounding's cost differs
    little between types; the forward's not at all), timed by part; then projected."""
    import numpy as np
    import torch

    from synthetic import ensure_checkpoint
    from nemoq.calib import ablations as ab
    from nemoq.calib.profile import FIT_MIXES, FIT_TOKENS, candidate_types, profiled_specs
    from nemoq.convert.config import load_config
    from nemoq.convert.pipeline import open_source
    torch.set_num_threads(1)
    source = open_source(ensure_checkpoint(args.cache_dir, "ME*"))
    cfg = ab.config_of(source)
    specs = [s for s in profiled_specs(source)]
    mixes = [{s.name: "q4_0" if "q4_0" in candidate_types(s) else candidate_types(s)[-1]} for s in specs]
    text = " ".join(f"word{i} text{i % 97} and more" for i in range(args.tokens * 2))   # any tokens do
    sequences = ab.plain_sequences(source, text, 512, args.tokens)
    clock: dict[str, list[float]] = {}

    def timed(key, fn):
        def wrapper(*a, **k):
            t0 = time.process_time()
            out = fn(*a, **k)
            clock.setdefault(key(*a, **k), []).append(time.process_time() - t0)
            return out
        return wrapper
    run = ab.StreamedKLD(source, mixes, sequences, device=torch.device("cpu"), first=64)
    def stream_kind(states, kind, weights):   # a stream through the layer's weights, or through a rounded tensor of it
        return kind + (" rounded" if any(isinstance(v, (ab.FileWeight, ab.FileStack)) for v in weights.values()) else "")
    run._through = timed(stream_kind, run._through)
    rounded = ab.rounded
    ab.rounded = timed(lambda spec, t, w: "round " + ("experts" if w.ndim == 3 else spec.name.split(".")[-2]),
                       rounded)
    # FileStack makes an expert's values when the forward indexes it: timed with the MoE forward
    run._head = timed(lambda base: "head", run._head)
    t0 = time.process_time()
    try:
        klds = run.run()
    finally:
        ab.rounded = rounded
    total = time.process_time() - t0
    clock["head"] = [(clock["head"][0] - sum(clock.get("round output", []))) / (len(mixes) + 1)]   # a stream's
    per = {k: round(float(np.mean(v)), 3) for k, v in clock.items()}
    counts = {k: len(v) for k, v in clock.items()}
    # a Nano profile: streams alive at each layer, 3 ablations per profiled tensor
    nano = load_config(NANO_CONFIG)
    kinds = nano.layer_kinds
    tensors_of = {"mamba": 2, "moe": 4, "attention": 4}
    alive, streams = [], 3   # the embeddings' three from the start
    for kind in kinds:
        alive.append(streams)    # streams through the layer's own weights; 3 per tensor through a rounded one
        streams += 3 * tensors_of[kind]
    ablation_streams = streams + 3                       # the head's three
    per_pass = max(1, ab.STREAM_BYTES // (args.tokens * cfg.hidden * 4))
    passes = -(-ablation_streams // per_pass)
    layers = sum((a + passes) * per[k] + 3 * tensors_of[k] * per[k + " rounded"]   # + each pass's full-precision
                 for a, k in zip(alive, kinds))                                     # stream
    head_s = (ablation_streams + passes) * per["head"]
    rounding = 3 * sum(per.get("round " + name, 0) * n for name, n in
                       (("experts", 2 * 23), ("ssm_in", 23), ("ssm_out", 23), ("ffn_up_shexp", 23),
                        ("ffn_down_shexp", 23), ("attn_q", 6), ("attn_k", 6), ("attn_v", 6),
                        ("attn_output", 6), ("output", 1), ("token_embd", 1)))
    # the fit mixes: every tensor rounded (each mix's own rounding of the model: as many roundings as
    # the ablations' three per tensor), beside their full-precision stream, on FIT_TOKENS
    fits = FIT_TOKENS / args.tokens * (sum(FIT_MIXES * per[k + " rounded"] + per[k] for k in kinds)
                                       + (FIT_MIXES + 1) * per["head"]) + rounding
    projected = {"layers_cpu_s": round(layers), "head_cpu_s": round(head_s), "rounding_cpu_s": round(rounding),
                 "fit_mixes_cpu_s": round(fits), "passes": passes, "streams": ablation_streams,
                 "peak_stream_gb": round(min(ablation_streams, per_pass) * args.tokens * cfg.hidden * 4 / 1e9, 2)}
    projected["total_cpu_h"] = round(sum(projected[k] for k in ("layers_cpu_s", "head_cpu_s", "rounding_cpu_s",
                                                                   "fit_mixes_cpu_s")) / 3600, 2)
    import resource
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    projected["peak_rss_gb"] = round((peak + (min(ablation_streams, per_pass) - len(mixes)) * args.tokens
                                      * cfg.hidden * 4) / 1e9, 2)   # this run's, with a pass's streams
    figures = {"tokens": int(sequences.size), "streams": len(mixes), "seconds_per_call": per, "calls": counts,
               "peak_rss_gb": round(peak / 1e9, 2),
               "run_cpu_s": round(total, 1), "klds": dict(zip((next(iter(m)) for m in mixes), klds)),
               "nano_projection": projected, "code": git_state()}
    print(json.dumps(figures, indent=1))
    return figures


if __name__ == "__main__":
    main()

"""Seconds to quantize one matrix per block format: numpy reference vs C kernels vs ggml (not in CI).

    .venv/bin/python bench/kernels_quant.py [--repeat 3] [--formats q4_k,q6_k] [--json FILE]

The matrix is an expert's down projection of Nemotron 3 Nano, 1856 x 2688 float32 with N(0, 0.02)
values, and 1856 x 4096 for the k-quants (2688 is not a multiple of their 256-value super-blocks).
Each format is timed without and with an importance vector (random, spanning six orders of
magnitude): the numpy reference (nemoq.quant.formats, one run), nemoq's C kernels with 1 and 2
threads (nemoq.kernels_c, best of --repeat), and ggml's own quantizer, ggml_quantize_chunk from
the llama-cpp-python wheel (single-threaded, best of --repeat). "C ns/v" is the 1-thread kernel's
process CPU time per value (best of --repeat): on a shared machine it counts only this process's
work, where wall-clock seconds count the neighbours' too. The last column counts the blocks
where the C bytes differ from numpy's (0: bit-identical).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gguf import GGMLQuantizationType  # noqa: E402

from nemoq import kernels_c  # noqa: E402
from nemoq.quant.formats import FORMATS  # noqa: E402

K_QUANTS = ("q4_k", "q5_k", "q6_k")


def best_time(fn, repeat: int, clock=time.perf_counter) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = clock()
        fn()
        best = min(best, clock() - t)
    return best


def ggml_quantizer():
    try:
        from tests.ggml_oracle import ggml_quantize
        ggml_quantize(np.zeros((1, 256), np.float32), GGMLQuantizationType.Q4_K)
        return ggml_quantize
    except Exception as e:  # no llama-cpp-python: leave the column empty
        print(f"ggml unavailable: {e}", file=sys.stderr)
        return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--formats", default=",".join(kernels_c.KERNEL_FORMATS))
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    status = kernels_c.status()
    if not status.available:
        sys.exit(f"C kernels unavailable: {status.message}")
    ggml = ggml_quantizer()
    rng = np.random.default_rng(0)
    mats = {n: (rng.standard_normal((1856, n)) * 0.02).astype(np.float32) for n in (2688, 4096)}
    imps = {n: (rng.random(n) ** 6 * 100).astype(np.float32) for n in (2688, 4096)}

    rows = []
    head = (f"{'format':8} {'shape':>10} {'imatrix':>7} {'numpy':>8} {'C 1t':>8} {'C 2t':>8} {'ggml':>8} "
            f"{'C ns/v':>7} {'numpy/C1':>8} {'ggml/C1':>8} {'differ':>6}")
    print(f"{status.compiler} {' '.join(status.flags)}")
    print(head)
    print("-" * len(head))
    for fmt in args.formats.split(","):
        n = 4096 if fmt in K_QUANTS else 2688
        x = mats[n]
        for imp in (None, imps[n]):
            t0 = time.perf_counter()
            ref = FORMATS[fmt].quantize(x, imp)
            t_np = time.perf_counter() - t0
            ours = kernels_c.quantize_rows(fmt, x, imp, threads=1)
            differ = int((ours.reshape(-1, FORMATS[fmt].type_size) != ref.reshape(-1, FORMATS[fmt].type_size))
                         .any(axis=1).sum())
            t_c1 = best_time(lambda: kernels_c.quantize_rows(fmt, x, imp, threads=1), args.repeat)
            cpu = best_time(lambda: kernels_c.quantize_rows(fmt, x, imp, threads=1), args.repeat, time.process_time)
            t_c2 = best_time(lambda: kernels_c.quantize_rows(fmt, x, imp, threads=2), args.repeat)
            qtype = GGMLQuantizationType[fmt.upper()]
            t_g = best_time(lambda: ggml(x, qtype, imp), args.repeat) if ggml else float("nan")
            row = dict(format=fmt, shape=f"{x.shape[0]}x{x.shape[1]}", imatrix=imp is not None, numpy=t_np,
                       c1=t_c1, c2=t_c2, ggml=t_g, c1_cpu_ns_per_value=cpu / x.size * 1e9, differ=differ)
            rows.append(row)
            print(f"{fmt:8} {row['shape']:>10} {('yes' if imp is not None else 'no'):>7} {t_np:8.3f} {t_c1:8.3f} "
                  f"{t_c2:8.3f} {t_g:8.3f} {row['c1_cpu_ns_per_value']:7.1f} {t_np / t_c1:8.1f} {t_g / t_c1:8.2f} {differ:6d}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()

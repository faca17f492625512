"""Benchmark nemoq's CUDA quantizer on a GPU, after checking the CUDA code on the CPU (not in CI).

    .venv/bin/python bench/kernels.py [--iters 30] [--json FILE]

1. CPU checks, always (no GPU needed): quants.cu's code run on the CPU equals the C quantizers
   bit for bit, and moe.cu's code run on the CPU equals the C MoE reference kernel bit for bit.
2. Without a CUDA GPU: prints "no CUDA GPU: nothing to measure" and exits 0 (1 if a check failed).
3. On a GPU: the CUDA quantizer on one expert matrix per format (Nemotron 3 Nano's widths, hidden
   2688 and expert 1856; Q4_K needs multiples of 256, so 2560 / 1792 stand in), input float32
   GB/s: kernel only, and with the host<->device copies, against the C quantizer on all cores;
   bytes compared with C.
nvcc builds for the GPU's own architecture (from nvidia-smi, unless NEMOQ_CUDA_ARCH is set).
The MoE reference kernel is not timed: no command runs it (docs/kernels.md).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _native_arch() -> str | None:
    """sm_XY of GPU 0 from nvidia-smi, so that nvcc builds for it (no PTX JIT at load)."""
    try:
        cap = subprocess.run(["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30).stdout.split()
    except (OSError, subprocess.TimeoutExpired):
        return None
    return f"sm_{cap[0].replace('.', '')}" if cap and cap[0].replace(".", "").isdigit() else None


if "NEMOQ_CUDA_ARCH" not in os.environ and _native_arch():   # read when nemoq.kernels_c.cuda is imported
    os.environ["NEMOQ_CUDA_ARCH"] = _native_arch()

from nemoq.kernels_c import quantize_rows  # noqa: E402
from nemoq.kernels_c import cuda, cuda_quant  # noqa: E402
from nemoq.kernels_c.moe import moe_matvec  # noqa: E402

REAL_WIDTHS = (2688, 1856)        # Nemotron 3 Nano: hidden, expert FFN
K_QUANT_WIDTHS = (2560, 1792)     # nearest multiples of 256
BENCH_FORMATS = ("nvfp4", "q4_k", "q8_0")
GB = 1e9


def widths(fmt: str) -> tuple[int, int]:
    return K_QUANT_WIDTHS if fmt.endswith("_k") else REAL_WIDTHS


# ---- 1. CPU checks ----

def cpu_checks(rng) -> list[dict]:
    rows = []
    x = (rng.standard_t(2, (32, 512)) * 0.02).astype(np.float32)
    imp = (rng.uniform(0, 1, 512) ** 6).astype(np.float32)
    for fmt in BENCH_FORMATS:
        same = all(np.array_equal(cuda_quant.emulate_quantize_rows(fmt, x, w), quantize_rows(fmt, x, w))
                   for w in (None, imp))
        rows.append({"check": f"quants.cu on the CPU == C quantizer ({fmt})", "ok": same, "detail": "bytes"})
    hidden, n_ff, n_exp = 512, 256, 8
    xs = rng.standard_normal((4, hidden)).astype(np.float32)
    ids = np.stack([rng.permutation(n_exp)[:6] for _ in range(4)]).astype(np.int32)
    w = rng.uniform(0.1, 1, ids.shape).astype(np.float32)
    for fmt in BENCH_FORMATS:
        up = quantize_rows(fmt, rng.standard_normal((n_exp * n_ff, hidden)).astype(np.float32) * 0.05)
        down = quantize_rows(fmt, rng.standard_normal((n_exp * hidden, n_ff)).astype(np.float32) * 0.05)
        up, down = up.reshape(n_exp, n_ff, -1), down.reshape(n_exp, hidden, -1)
        args = (xs, ids, w, up, down, fmt, fmt)
        same = np.array_equal(cuda.emulate_matvec(*args), moe_matvec(*args))
        rows.append({"check": f"moe.cu on the CPU == C MoE reference ({fmt})", "ok": same, "detail": "bits"})
    return rows


# ---- 3. GPU measurements ----

def quantizer_rows(iters: int, rng) -> list[dict]:
    rows = []
    threads = os.cpu_count() or 1
    for fmt in BENCH_FORMATS:
        hidden, n_ff = widths(fmt)
        x = (rng.standard_normal((n_ff, hidden)) * 0.02).astype(np.float32)
        imp = (rng.uniform(0, 1, hidden) ** 6).astype(np.float32)
        for importance in (None, imp):
            kernel, wall, c_best = float("inf"), float("inf"), float("inf")
            for _ in range(max(3, iters // 10)):
                t = time.perf_counter()
                got, k = cuda_quant.cuda_quantize_timed(fmt, x, importance)
                wall, kernel = min(wall, time.perf_counter() - t), min(kernel, k)
                t = time.perf_counter()
                want = quantize_rows(fmt, x, importance, threads=threads)
                c_best = min(c_best, time.perf_counter() - t)
            rows.append({"format": fmt, "shape": list(x.shape), "importance": importance is not None,
                         "gpu_kernel_gb_per_s": x.nbytes / kernel / GB,
                         "gpu_with_copies_gb_per_s": x.nbytes / wall / GB,
                         "c_gb_per_s": x.nbytes / c_best / GB, "c_threads": threads,
                         "ok": bool(np.array_equal(got, want))})
    return rows


# ---- report ----

def print_table(title: str, rows: list[dict], columns: list[tuple[str, str, str]]) -> None:
    print(f"\n{title}")
    cells = [[h for h, _, _ in columns]] + [[("-" if r.get(k) is None else format(r[k], f)) for _, k, f in columns]
                                             for r in rows]
    widths_ = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    for line in cells:   # first column left, numbers right
        print("  ".join(c.rjust(wd) if j else c.ljust(wd) for j, (c, wd) in enumerate(zip(line, widths_))))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=30, help="timed calls per measurement (best of them is reported)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(2) as pool:   # nvcc builds the two libraries side by side
        list(pool.map(lambda f: f(), (cuda.library, cuda_quant.library)))
    result: dict = {"build_seconds": time.perf_counter() - t0}
    status = cuda.cuda_status()
    if not status.built or status.quantizer != "built":
        print(f"no CUDA GPU: nothing to measure (CUDA sources not built: {status.message}; "
              f"quantizer: {status.quantizer})")
        return 0 if status.nvcc is None else 1   # no nvcc is expected; a failed build is not
    result["cpu_checks"] = checks = cpu_checks(rng)
    print_table("CPU checks (the .cu code run on the CPU)", checks, [("check", "check", ""), ("ok", "ok", ""),
                                                                      ("detail", "detail", "")])
    ok = all(c["ok"] for c in checks)
    if not status.usable:
        print(f"\nno CUDA GPU: nothing to measure ({status.message})")
        result["gpu"] = None
    else:
        result["quantizer"] = quant = quantizer_rows(args.iters, rng)
        print_table("CUDA quantizer vs C (input float32 GB/s)", quant,
                    [("format", "format", ""), ("imatrix", "importance", ""),
                     ("GPU kernel", "gpu_kernel_gb_per_s", ".2f"),
                     ("GPU + copies", "gpu_with_copies_gb_per_s", ".2f"), ("C", "c_gb_per_s", ".3f"),
                     ("C threads", "c_threads", "d"), ("bytes == C", "ok", "")])
        ok = ok and all(r["ok"] for r in quant)
    result["seconds"] = time.perf_counter() - t0
    print(f"\n{'all checks passed' if ok else 'SOME CHECKS FAILED'} in {result['seconds']:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

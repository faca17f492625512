"""Benchmark nemoq's CUDA kernels on a GPU, after checking their code on the CPU (not in CI).

    .venv/bin/python bench/kernels.py [--iters 30] [--json FILE]

1. CPU checks, always (no GPU needed): quants.cu's code run on the CPU equals the C quantizers
   bit for bit, and moe.cu's code run on the CPU equals the C MoE kernel (kernels_c.moe).
2. Without a CUDA GPU: prints "no CUDA GPU: nothing to measure" and exits 0 (1 if a check failed).
3. On a GPU:
   - memory bandwidth: a 1 GiB device-to-device copy (bench/moe_timing.cu), 2 x bytes / s
     (read + write), best of --iters;
   - MoE matvec (moe.cu's kernels, timed with CUDA events, each call after an L2 flush) for
     NVFP4 / Q4_K / Q8_0 experts at Nemotron 3 Nano's widths (hidden 2688, expert 1856; Q4_K
     needs multiples of 256, so 2560 / 1792 stand in), 128 experts, top-6, T = 1, 4, 16 tokens:
     bytes of expert weights read per second (the distinct routed experts' up and down bytes),
     its ratio to the copy bandwidth (target >= 70%), and torch's eager MoE loop over the same
     experts with weights dequantized beforehand (nemoq's C dequantizer -> bf16 on the GPU; only
     the torch matmuls and activations are timed, also after an L2 flush). The GPU result is
     checked against the C kernel;
   - the CUDA quantizer on one expert matrix per format, input float32 GB/s: kernel only, and
     with the host<->device copies, against the C quantizer on all cores; bytes compared with C.
Expert stacks are rows of a quantized pool drawn at random (so 128 distinct experts exist in
memory, no row pattern helps the kernel). nvcc builds for the GPU's own architecture (from
nvidia-smi, unless NEMOQ_CUDA_ARCH is set). One command, well under 3 minutes on an H100 once
nvcc has built the three libraries (a minute or two, in parallel).
"""

from __future__ import annotations

import argparse
import ctypes
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

from nemoq.kernels_c import dequantize_rows, quantize_rows  # noqa: E402
from nemoq.kernels_c import cuda, cuda_quant  # noqa: E402
from nemoq.kernels_c.moe import moe_matvec, route  # noqa: E402

TIMING_SOURCE = Path(__file__).resolve().parent / "moe_timing.cu"
KERNELS_DIR = cuda.SOURCE.parent
REAL_WIDTHS = (2688, 1856)        # Nemotron 3 Nano: hidden, expert FFN
K_QUANT_WIDTHS = (2560, 1792)     # nearest multiples of 256
BENCH_FORMATS = ("nvfp4", "q4_k", "q8_0")
N_EXPERTS, TOP_K, TOKENS = 128, 6, (1, 4, 16)
POOL_ROWS = 256
COPY_BYTES = 1 << 30
FLUSH_BYTES = 256 << 20           # several times the L2 of an H100 / H200 (50 MB)
TOLERANCE = 1e-5                  # max |gpu - C| / max |C|, as tests/test_moe_matvec.py
GB = 1e9

_p, _i64, _int, _buf, _fp = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p
_TIMING_SIGNATURES = {
    "nemoq_bench_copy": ([_i64, _int, _fp, _buf, _int], _int),
    "nemoq_bench_moe": ([_p, _int, _p, _int, _i64, _i64, _i64, _p, _i64, _i64, _p, _p, _i64, _p, _p, _p, _p, _p,
                         _int, _i64, _fp, _buf, _int], _int),
}


def timing_library():
    """bench/moe_timing.cu (moe.cu's kernels plus timers) built like nemoq's own CUDA libraries."""
    flags = [*cuda.NVCC_FLAGS, "-I", str(KERNELS_DIR)]
    return cuda.build_and_load(TIMING_SOURCE, "libnemoq_bench_cuda.so", flags, _TIMING_SIGNATURES,
                               includes=(cuda.SOURCE,))


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
    ids = np.stack([rng.permutation(n_exp)[:TOP_K] for _ in range(4)]).astype(np.int32)
    w = rng.uniform(0.1, 1, ids.shape).astype(np.float32)
    for fmt in BENCH_FORMATS:
        up = quantize_rows(fmt, rng.standard_normal((n_exp * n_ff, hidden)).astype(np.float32) * 0.05)
        down = quantize_rows(fmt, rng.standard_normal((n_exp * hidden, n_ff)).astype(np.float32) * 0.05)
        up, down = up.reshape(n_exp, n_ff, -1), down.reshape(n_exp, hidden, -1)
        ref = moe_matvec(xs, ids, w, up, down, fmt, fmt)
        err = float(np.abs(cuda.emulate_matvec(xs, ids, w, up, down, fmt, fmt) - ref).max() / np.abs(ref).max())
        rows.append({"check": f"moe.cu on the CPU ~ C MoE kernel ({fmt})", "ok": err <= TOLERANCE,
                     "detail": f"rel. error {err:.1e}"})
    return rows


# ---- 3. GPU measurements ----

def _errbuf():
    return ctypes.create_string_buffer(512)


def copy_bandwidth(lib, iters: int) -> float:
    ms, err = np.zeros(iters, np.float32), _errbuf()
    if lib.nemoq_bench_copy(COPY_BYTES, iters, ms.ctypes.data, err, len(err)):
        raise RuntimeError(err.value.decode())
    return 2 * COPY_BYTES / (float(ms.min()) / 1e3)


def expert_stacks(fmt: str, rng):
    """128 experts whose rows are drawn from a quantized pool: uint8 (E, rows, row bytes) each."""
    hidden, n_ff = widths(fmt)
    pools = [quantize_rows(fmt, rng.standard_normal((POOL_ROWS, n)).astype(np.float32) * 0.02) for n in (hidden, n_ff)]
    up = pools[0][rng.integers(0, POOL_ROWS, (N_EXPERTS, n_ff))]
    down = pools[1][rng.integers(0, POOL_ROWS, (N_EXPERTS, hidden))]
    return up, down, hidden, n_ff


def gpu_moe(lib, experts, x, ids, w, iters: int) -> tuple[np.ndarray, np.ndarray]:
    n_tokens = x.shape[0]
    r = route(ids, w, N_EXPERTS, n_tokens)
    token_start, token_slot = cuda._token_slots(r, n_tokens)
    out, ms, err = np.empty_like(x), np.zeros(iters, np.float32), _errbuf()
    code = lib.nemoq_bench_moe(experts.up_ptr, cuda.TYPE_IDS[experts.up_format], experts.down_ptr,
                               cuda.TYPE_IDS[experts.down_format], N_EXPERTS, experts.n_ff, experts.hidden,
                               x.ctypes.data, n_tokens, len(r.group_expert), r.group_expert.ctypes.data,
                               r.group_start.ctypes.data, r.n_slots, r.slot_token.ctypes.data,
                               r.slot_weight.ctypes.data, token_start.ctypes.data, token_slot.ctypes.data,
                               out.ctypes.data, iters, FLUSH_BYTES, ms.ctypes.data, err, len(err))
    if code:
        raise RuntimeError(err.value.decode())
    return out, ms / 1e3


def torch_moe_seconds(torch, fmt, up, down, x, ids, w, iters: int) -> float | None:
    """Best time of torch's eager MoE loop on bf16 weights dequantized beforehand (matmuls only)."""
    dev = torch.device("cuda")
    used = np.unique(ids)
    up_w = {int(e): torch.from_numpy(dequantize_rows(fmt, up[e])).to(dev, torch.bfloat16) for e in used}
    down_w = {int(e): torch.from_numpy(dequantize_rows(fmt, down[e])).to(dev, torch.bfloat16) for e in used}
    xt = torch.from_numpy(x).to(dev, torch.bfloat16)
    groups = [(int(e), torch.from_numpy(np.nonzero(ids == e)[0]).to(dev),
               torch.from_numpy(w[ids == e]).to(dev, torch.bfloat16)[:, None]) for e in used]
    flush = torch.empty(FLUSH_BYTES, dtype=torch.uint8, device=dev)
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(iters):
        flush.fill_(1)
        out = torch.zeros_like(xt)
        start.record()
        for e, tokens, weight in groups:
            h = torch.relu(xt[tokens] @ up_w[e].T).square()
            out.index_add_(0, tokens, (h @ down_w[e].T) * weight)
        stop.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(stop) / 1e3)
    return best


def moe_rows(lib, bandwidth: float, iters: int, rng, torch) -> list[dict]:
    rows = []
    for fmt in BENCH_FORMATS:
        up, down, hidden, n_ff = expert_stacks(fmt, rng)
        per_expert = up[0].nbytes + down[0].nbytes
        with cuda.CudaExperts(up, down, fmt, fmt) as experts:
            for n_tokens in TOKENS:
                x = rng.standard_normal((n_tokens, hidden)).astype(np.float32)
                ids = np.stack([rng.permutation(N_EXPERTS)[:TOP_K] for _ in range(n_tokens)]).astype(np.int32)
                w = rng.uniform(0.1, 1, ids.shape).astype(np.float32)
                y, seconds = gpu_moe(lib, experts, x, ids, w, iters)
                ref = moe_matvec(x, ids, w, up, down, fmt, fmt)
                err = float(np.abs(y - ref).max() / np.abs(ref).max())
                read = len(np.unique(ids)) * per_expert
                best = float(seconds.min())
                t_torch = torch_moe_seconds(torch, fmt, up, down, x, ids, w, iters) if torch else None
                rows.append({"format": fmt, "hidden": hidden, "n_ff": n_ff, "tokens": n_tokens,
                             "experts_read": len(np.unique(ids)), "bytes_read": read,
                             "us_best": best * 1e6, "us_median": float(np.median(seconds)) * 1e6,
                             "gb_per_s": read / best / GB, "of_bandwidth": read / best / bandwidth,
                             "torch_bf16_us": t_torch * 1e6 if t_torch else None,
                             "speedup_vs_torch": t_torch / best if t_torch else None,
                             "rel_error_vs_c": err, "ok": err <= TOLERANCE})
    return rows


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
    with ThreadPoolExecutor(3) as pool:   # nvcc builds the three libraries side by side
        timing = pool.submit(timing_library)
        list(pool.map(lambda f: f(), (cuda.library, cuda_quant.library)))
        timing_lib, timing_msg, _ = timing.result()
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
    if not status.usable or timing_lib is None:
        why = status.message if timing_lib is not None else f"timing library: {timing_msg}"
        print(f"\nno CUDA GPU: nothing to measure ({why})")
        result["gpu"] = None
    else:
        try:
            import torch
            torch = torch if torch.cuda.is_available() else None
        except ImportError:
            torch = None
        result["torch_baseline"] = "bf16 eager loop, weights dequantized beforehand" if torch else "torch without CUDA"
        bandwidth = copy_bandwidth(timing_lib, args.iters)
        result["copy_gb_per_s"] = bandwidth / GB
        print(f"\ndevice-to-device copy: {bandwidth / GB:.0f} GB/s (read + write, best of {args.iters})")
        result["moe"] = moe = moe_rows(timing_lib, bandwidth, args.iters, rng, torch)
        print_table(f"MoE matvec, {N_EXPERTS} experts, top-{TOP_K} (cold L2; torch: {result['torch_baseline']})", moe,
                    [("format", "format", ""), ("H", "hidden", "d"), ("I", "n_ff", "d"), ("T", "tokens", "d"),
                     ("experts", "experts_read", "d"), ("us", "us_best", ".1f"), ("GB/s", "gb_per_s", ".0f"),
                     ("of copy", "of_bandwidth", ".0%"), ("torch us", "torch_bf16_us", ".1f"),
                     ("x torch", "speedup_vs_torch", ".1f"), ("rel err", "rel_error_vs_c", ".1e"), ("ok", "ok", "")])
        result["quantizer"] = quant = quantizer_rows(args.iters, rng)
        print_table("CUDA quantizer vs C (input float32 GB/s)", quant,
                    [("format", "format", ""), ("imatrix", "importance", ""),
                     ("GPU kernel", "gpu_kernel_gb_per_s", ".2f"),
                     ("GPU + copies", "gpu_with_copies_gb_per_s", ".2f"), ("C", "c_gb_per_s", ".3f"),
                     ("C threads", "c_threads", "d"), ("bytes == C", "ok", "")])
        ok = ok and all(r["ok"] for r in moe + quant)
    result["seconds"] = time.perf_counter() - t0
    print(f"\n{'all checks passed' if ok else 'SOME CHECKS FAILED'} in {result['seconds']:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

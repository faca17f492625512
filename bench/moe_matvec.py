"""Benchmark the C MoE kernel (nemoq.kernels_c.moe.moe_matvec) against this machine's memory bandwidth.

    .venv/bin/python bench/moe_matvec.py [--formats q8_0,nvfp4] [--experts 32] [--repeat 10] [--rounds 10] [--activations f32,q8]

For one token (T = 1) routed to k = 6 of E experts, the kernel reads 6 up and 6 down matrices
in a block format; what counts is how fast it streams those bytes. The script:
1. measures memory bandwidth as numpy copies of 1 GB (counted as 2 x bytes / s: read + write),
   on one thread (once per round, the best counts) and split across all cores, and as a pure
   read (numpy sums of 1 GB, all cores, once per round) for context;
2. per format, quantizes one expert pair of Nemotron 3 Nano's widths (H = 2688, I = 1856; the
   k-quants need multiples of 256, so Q4_K / Q5_K / Q6_K use H = 2560, I = 1792 stand-ins),
   copies it to E experts (E * 2 matrices, far larger than the CPU caches), and times calls with
   6 fresh random experts each, on one thread and on all cores;
3. times every case in rounds (--rounds, each --repeat calls per case, the copy measured once
   per round), so that a slow spell of a shared machine costs all rows alike, then prints
   bytes of expert weights read per second and its ratio to the best 1-thread copy of the run
   (target >= 60%), one row per activations mode ("f32": exact; "q8": x and the hidden
   vectors rounded to ggml's 8-bit activations (Q8_0, Q8_K for k-quants) and integer dot
   products, llama.cpp's CPU numerics), the relative error against the numpy reference of the
   same mode (for q8 mostly rounding flips of the hidden vectors: float32 in another order),
   and for comparison torch's dequantize-then-matmul of the same 6 experts (nemoq's numpy
   dequantizer, then torch.matmul in float32) and torch.matmul alone on experts dequantized
   beforehand (4 bytes per weight read);
4. where nemoq's CUDA kernel builds and a GPU is present, the same calls on the GPU (stacks
   uploaded once; each call copies x and the routing in and the result out).

--in-cache instead times the up phase alone on 256 rows of one expert (L2 resident), one
thread, f32 and q8 calls alternated, best of `repeat` x 20 calls: the kernels' compute speed
per core, which does not depend on what else shares the memory bus.

The machine may be shared: the load average is printed, and best-of-N times are reported.
Not part of the test suite.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from nemoq.kernels_c import moe
from nemoq.kernels_c.moe import ACTIVATIONS, MOE_FORMATS, TYPE_IDS, available, moe_matvec
from nemoq.quant.formats import FORMATS
from nemoq.quant.moe_reference import moe_matvec_reference

try:
    from nemoq.kernels_c.cuda import CudaExperts, cuda_status
except ImportError:   # the CUDA helper is optional
    CudaExperts = cuda_status = None

REAL_WIDTHS = (2688, 1856)        # Nemotron 3 Nano: hidden, expert FFN
K_QUANT_WIDTHS = (2560, 1792)     # nearest multiples of 256
TOP_K = 6
GB = 1e9


def copy_bandwidth(nbytes: int = 1 << 30, threads: int = 1, repeat: int = 3) -> float:
    """2 * bytes / s of the best of `repeat` numpy copies of nbytes, split over `threads`."""
    src = np.ones(nbytes // 8, np.float64)
    dst = np.empty_like(src)
    parts = np.array_split(np.arange(len(src)), threads)
    slices = [slice(p[0], p[-1] + 1) for p in parts]
    best = float("inf")
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(repeat):
            t = time.perf_counter()
            list(pool.map(lambda s: np.copyto(dst[s], src[s]), slices))
            best = min(best, time.perf_counter() - t)
    return 2 * src.nbytes / best


def read_bandwidth(nbytes: int = 1 << 30, threads: int = 1, repeat: int = 3) -> float:
    """bytes / s of the best of `repeat` numpy sums of nbytes of int64, split over `threads`: a
    pure read (a C loop of AVX2 loads measured the same here), what the kernel does to the weights."""
    parts = np.array_split(np.ones(nbytes // 8, np.int64), threads)
    best = float("inf")
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(repeat):
            t = time.perf_counter()
            list(pool.map(np.sum, parts))
            best = min(best, time.perf_counter() - t)
    return nbytes / best


def expert_stacks(fmt: str, n_experts: int, rng):
    hidden, n_ff = K_QUANT_WIDTHS if FORMATS[fmt].block_size == 256 else REAL_WIDTHS
    up1 = FORMATS[fmt].quantize(rng.standard_normal((n_ff, hidden)).astype(np.float32) * 0.02)
    down1 = FORMATS[fmt].quantize(rng.standard_normal((hidden, n_ff)).astype(np.float32) * 0.02)
    up = np.ascontiguousarray(np.broadcast_to(up1, (n_experts, *up1.shape)))   # E distinct copies in memory
    down = np.ascontiguousarray(np.broadcast_to(down1, (n_experts, *down1.shape)))
    return up, down, hidden, n_ff


def time_calls(fn, n_experts: int, repeat: int, rng) -> float:
    """Best time of `repeat` calls, each routed to 6 experts not used by the call before."""
    best, previous = float("inf"), set()
    for _ in range(repeat):
        ids = rng.choice([e for e in range(n_experts) if e not in previous], TOP_K, replace=False)
        previous = set(ids.tolist())
        t = time.perf_counter()
        fn(ids[None].astype(np.int32))
        best = min(best, time.perf_counter() - t)
    return best


class Case:
    """One format's expert stacks and call; torch and GPU columns measured once at set-up."""

    def __init__(self, fmt, up, down, hidden, n_ff, x, w):
        self.fmt, self.up, self.down, self.hidden, self.n_ff, self.x, self.w = fmt, up, down, hidden, n_ff, x, w
        self.nbytes = TOP_K * (up[0].nbytes + down[0].nbytes)
        self.torch_cols = self.gpu_cols = ""

    @classmethod
    def make(cls, fmt: str, args, rng, use_gpu: bool) -> "Case":
        up, down, hidden, n_ff = expert_stacks(fmt, args.experts, rng)
        case = cls(fmt, up, down, hidden, n_ff, rng.standard_normal((1, hidden)).astype(np.float32),
                   np.full((1, TOP_K), 2.5 / TOP_K, np.float32))
        x, w = case.x, case.w
        if not args.no_torch:
            import torch
            t_deq = time_calls(lambda ids: torch_dequantize_matmul(x, ids, w, up, down, fmt), args.experts,
                               max(2, args.repeat // 5), rng)
            ups = [torch.from_numpy(FORMATS[fmt].dequantize(up[e])) for e in range(TOP_K)]
            downs = [torch.from_numpy(FORMATS[fmt].dequantize(down[e])) for e in range(TOP_K)]
            xt = torch.from_numpy(x[0])
            t_mm = time_calls(lambda ids: sum(d @ torch.relu(u @ xt) ** 2 for u, d in zip(ups, downs)),
                              args.experts, args.repeat, rng)
            case.torch_cols = f"{t_deq * 1e3:9.1f} ms {t_mm * 1e3:9.1f} ms"
        if use_gpu:
            with CudaExperts(up, down, fmt, fmt) as experts:
                t_gpu = time_calls(lambda ids: experts.matvec(x, ids, w), args.experts, args.repeat, rng)
            case.gpu_cols = f" | {t_gpu * 1e3:5.2f} ms {case.nbytes / t_gpu / GB:7.1f}"
        return case

    def call(self, ids, threads: int, activations: str):
        return moe_matvec(self.x, ids, self.w, self.up, self.down, self.fmt, self.fmt, threads=threads,
                          activations=activations)

    def error(self, activations: str, threads: int, rng) -> float:
        """max |kernel - numpy reference of the same mode| / max |reference| on random experts."""
        ids = rng.choice(len(self.up), TOP_K, replace=False)[None].astype(np.int32)
        ref = moe_matvec_reference(self.x, ids, self.w, self.up, self.down, self.fmt, self.fmt,
                                   activations=activations)
        return float(np.abs(self.call(ids, threads, activations) - ref).max() / np.abs(ref).max())


def torch_dequantize_matmul(x, ids, w, up, down, fmt):
    import torch
    xt = torch.from_numpy(x[0])
    y = torch.zeros_like(xt)
    for e, we in zip(ids[0], w[0]):
        up_e = torch.from_numpy(FORMATS[fmt].dequantize(up[e]))
        down_e = torch.from_numpy(FORMATS[fmt].dequantize(down[e]))
        y += float(we) * (down_e @ torch.relu(up_e @ xt) ** 2)
    return y


def in_cache(formats: list[str], repeat: int, rows: int = 256) -> None:
    """G values / s of the up phase on `rows` rows of one expert, per activations mode, one thread."""
    fns, rng = moe._functions(), np.random.default_rng(0)
    one = np.zeros(1, np.int32), np.array([0, 1], np.int64), np.zeros(1, np.int32)
    ptr = [a.ctypes.data for a in one]
    print(f"in cache: up phase on {rows} rows of one expert, 1 thread, best of {repeat} x 20 calls per mode\n")
    print(f"{'format':7} {'values':>8} | {'f32 G values/s':>15} {'q8 G values/s':>14} {'speed-up':>9}")
    for fmt in formats:
        hidden = K_QUANT_WIDTHS[0] if FORMATS[fmt].block_size == 256 else REAL_WIDTHS[0]
        up = FORMATS[fmt].quantize(rng.standard_normal((rows, hidden)).astype(np.float32) * 0.02)
        x = rng.standard_normal((1, hidden)).astype(np.float32)
        xq = moe._q8(fns, x, fmt)
        h = np.empty(rows, np.float32)
        args = {   # pointers taken once: ctypes' per-call overhead stays small beside ~50 us calls
            "f32": (fns["nemoq_moe_up"], up.ctypes.data, TYPE_IDS[fmt], rows, hidden, x.ctypes.data),
            "q8": (fns["nemoq_moe_q8_up"], up.ctypes.data, TYPE_IDS[fmt], rows, hidden,
                     *(a.ctypes.data for a in xq)),
        }
        calls = {mode: (f, (*a, 1, *ptr, None, h.ctypes.data, 0, rows)) for mode, (f, *a) in args.items()}
        best = dict.fromkeys(calls, float("inf"))
        for _ in range(repeat):
            for mode, (f, a) in calls.items():
                t = time.perf_counter()
                for _ in range(20):
                    f(*a)
                best[mode] = min(best[mode], (time.perf_counter() - t) / 20)
        rate = {mode: rows * hidden / t / GB for mode, t in best.items()}
        print(f"{fmt:7} {rows * hidden:8} | {rate['f32']:15.1f} {rate['q8']:14.1f} {rate['q8'] / rate['f32']:8.1f}x",
              flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--formats", default=",".join(MOE_FORMATS))
    parser.add_argument("--experts", type=int, default=32, help="experts per stack (default 32)")
    parser.add_argument("--repeat", type=int, default=10, help="timed calls per case and round; the best counts")
    parser.add_argument("--rounds", type=int, default=10, help="rounds over all cases (default 10)")
    parser.add_argument("--activations", default=",".join(ACTIVATIONS), help="modes to time, one row each")
    parser.add_argument("--no-torch", action="store_true", help="skip the torch comparison")
    parser.add_argument("--in-cache", action="store_true", help="time the up phase in cache instead (see above)")
    args = parser.parse_args()
    if not available():
        raise SystemExit("the C kernels could not be built (see `nemoq info --kernels`)")
    if args.in_cache:
        return in_cache(args.formats.split(","), args.repeat)
    cores = os.cpu_count() or 1
    print(f"machine: {platform.machine()} {platform.processor() or ''}, {cores} cores; "
          f"load average before: {tuple(round(v, 2) for v in os.getloadavg())}")
    bwn = copy_bandwidth(threads=cores) if cores > 1 else None
    gpu = cuda_status() if cuda_status else None
    print(f"CUDA: {gpu.message if gpu else 'nemoq.kernels_c.cuda unavailable'}")
    use_gpu = bool(gpu and gpu.usable)
    rng = np.random.default_rng(0)
    cases = [Case.make(fmt, args, rng, use_gpu) for fmt in args.formats.split(",")]
    modes = args.activations.split(",")
    # Rounds over every case, the copy measured once per round: a slow spell of a shared machine
    # then costs every row alike, and each row (and the copy) keeps its best round.
    best, copies, reads = {}, [], []
    for _ in range(args.rounds):
        copies.append(copy_bandwidth(threads=1))
        reads.append(read_bandwidth(threads=cores))
        for case in cases:
            for acts in modes:
                for threads in sorted({1, cores}):
                    t = time_calls(lambda ids: case.call(ids, threads, acts), args.experts, args.repeat, rng)
                    best[case.fmt, acts, threads] = min(best.get((case.fmt, acts, threads), float("inf")), t)
    bandwidth = max(copies)
    print(f"memory bandwidth (numpy copy of 1 GB, 2 x bytes / s): {bandwidth / GB:.1f} GB/s on 1 thread (best of "
          f"{len(copies)} rounds; {min(copies) / GB:.1f} in the worst)"
          + (f", {bwn / GB:.1f} GB/s on {cores}" if bwn else "") + "; ratios below use the 1-thread best")
    print(f"pure read (numpy sum of 1 GB of int64) on {cores} threads: {max(reads) / GB:.1f} GB/s (best of the rounds)")
    print(f"T = 1 token, k = {TOP_K} of E = {args.experts} experts; best of {args.rounds} rounds x {args.repeat} calls\n")
    header = (f"{'format':7} {'acts':4} {'H x I':>11} {'MB/call':>8} | {'C 1 thr':>8} {'GB/s':>6} {'ratio':>6} | "
              f"{'C ' + str(cores) + ' thr':>8} {'GB/s':>6} {'ratio':>6} | {'torch deq+mm':>12} {'torch f32 mm':>12} | "
              f"{'rel.err':>8}" + (f" | {'GPU':>8} {'GB/s':>7}" if use_gpu else ""))
    print(header)
    print("-" * len(header))
    for case in cases:
        extra = [case.torch_cols, case.gpu_cols]
        for acts in modes:
            t1, tn = best[case.fmt, acts, 1], best[case.fmt, acts, cores]
            print(f"{case.fmt:7} {acts:4} {f'{case.hidden}x{case.n_ff}':>11} {case.nbytes / 1e6:8.1f} | "
                  f"{t1 * 1e3:5.1f} ms {case.nbytes / t1 / GB:6.2f} {case.nbytes / t1 / bandwidth:6.0%} | "
                  f"{tn * 1e3:5.1f} ms {case.nbytes / tn / GB:6.2f} {case.nbytes / tn / bandwidth:6.0%} | "
                  f"{extra[0]:>25} | {case.error(acts, cores, rng):8.1e}{extra[1]}", flush=True)
            extra = ["", ""]   # once per format
    print(f"\n{cores} threads as a share of the {cores}-thread pure read ({max(reads) / GB:.1f} GB/s):")
    for case in cases:
        print("  " + case.fmt.ljust(7) + "  ".join(f"{acts} {case.nbytes / best[case.fmt, acts, cores] / max(reads):4.0%}"
                                                 for acts in modes))
    print(f"\nload average after: {tuple(round(v, 2) for v in os.getloadavg())}; torch threads: ", end="")
    try:
        import torch
        print(torch.get_num_threads())
    except ImportError:
        print("torch not installed")
    print("Q4_K / Q5_K / Q6_K rows use 2560 x 1792 stand-ins: Nemotron 3 Nano's 2688 / 1856 are not multiples "
          "of 256, so nemoq's recipes put those experts in IQ4_NL / Q5_0 / Q8_0 instead.")
    print("torch f32 mm reads 6 pre-dequantized float32 experts (4 bytes per weight), from memory "
          "only while 6 experts exceed the caches.")


if __name__ == "__main__":
    main()

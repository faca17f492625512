"""A/B of the C MoE kernel: a git revision's kernels against the working tree's, in one process.

    .venv/bin/python bench/moe_ab.py REV [--formats iq4_nl,nvfp4] [--threads 2] [--activations q8] [--calls 25]

Builds nemoq/kernels_c of REV (git archive, the same compiler and flags as nemoq's own build)
and of the working tree, then times whole `moe_matvec` calls (T = 1, top-6 of 32 experts at
Nemotron 3 Nano's widths, 2560 x 1792 for the k-quants) of the two libraries alternately, each
call on 6 experts the call before did not use, and prints the best GB/s of expert weights read
by each and their ratio. Alternating in one process is what makes a few percent visible on a
shared machine whose speed drifts by more than that between runs. Both revisions need the
one-call driver (moe_run.c: nemoq_moe_matvec). Not part of the test suite.
"""

from __future__ import annotations

import argparse
import ctypes
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nemoq.kernels_c import build, moe  # noqa: E402
from nemoq.kernels_c.moe import TYPE_IDS, _Call  # noqa: E402
from nemoq.quant.formats import FORMATS  # noqa: E402

N_EXPERTS, TOP_K, GB = 32, 6, 1e9


def library_of(rev: str, workdir: Path) -> dict:
    """REV's kernels built into workdir, bound as nemoq.kernels_c.moe binds its own."""
    archive = subprocess.run(["git", "archive", rev, "nemoq/kernels_c"], cwd=ROOT, check=True,
                             capture_output=True).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        if hasattr(tarfile, "data_filter"):   # Python >= 3.11.4: plain files only
            tar.extractall(workdir, filter="data")
        else:
            tar.extractall(workdir)
    sources = sorted((workdir / "nemoq" / "kernels_c").glob("*.c"))
    target = workdir / "libnemoq_ab.so"
    subprocess.run([build.compiler(), *build.flags(), *map(str, sources), "-o", str(target), "-lm"], check=True)
    return moe._bind(ctypes.CDLL(str(target)))


def stacks(fmt: str, rng):
    hidden, n_ff = (2560, 1792) if FORMATS[fmt].block_size == 256 else (2688, 1856)
    one = [FORMATS[fmt].quantize(rng.standard_normal(shape).astype(np.float32) * 0.02)
           for shape in ((n_ff, hidden), (hidden, n_ff))]
    up, down = (np.ascontiguousarray(np.broadcast_to(m, (N_EXPERTS, *m.shape))) for m in one)
    return up, down, hidden, n_ff


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("rev", help="git revision to compare with the working tree")
    ap.add_argument("--formats", default="q8_0,q5_0,iq4_nl,mxfp4,nvfp4,q4_k")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--activations", default="q8", choices=moe.ACTIVATIONS)
    ap.add_argument("--calls", type=int, default=25, help="calls per library and format; the best counts")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        libs = {args.rev: library_of(args.rev, Path(tmp)), "working tree": moe._functions()}
        if not all("nemoq_moe_matvec" in fns for fns in libs.values()):
            raise SystemExit(f"{args.rev} has no one-call driver (nemoq_moe_matvec)")
        rng = np.random.default_rng(0)
        print(f"T = 1, top-{TOP_K} of {N_EXPERTS} experts, {args.threads} threads, activations {args.activations}, "
              f"best of {args.calls} calls each, libraries alternated")
        for fmt in args.formats.split(","):
            up, down, hidden, n_ff = stacks(fmt, rng)
            x, w = rng.standard_normal((1, hidden)).astype(np.float32), np.full((1, TOP_K), 2.5 / TOP_K, np.float32)
            out = np.empty((1, hidden), np.float32)
            nbytes = TOP_K * (up[0].nbytes + down[0].nbytes)
            best, previous = dict.fromkeys(libs, float("inf")), set()
            for call in range(args.calls):
                ids = rng.choice([e for e in range(N_EXPERTS) if e not in previous], TOP_K, replace=False)
                previous, ids = set(ids.tolist()), ids[None].astype(np.int32)
                c = _Call(up.ctypes.data, down.ctypes.data, TYPE_IDS[fmt], TYPE_IDS[fmt], N_EXPERTS, n_ff, hidden, 1,
                          TOP_K, x.ctypes.data, ids.ctypes.data, w.ctypes.data, None, None,
                          args.activations != "f32", args.threads, out.ctypes.data)
                for name in (list(libs) if call % 2 == 0 else list(libs)[::-1]):
                    t = time.perf_counter()
                    if libs[name]["nemoq_moe_matvec"](ctypes.addressof(c)):
                        raise SystemExit(f"{name}: the kernel refused {fmt}")
                    best[name] = min(best[name], time.perf_counter() - t)
            old, new = (nbytes / best[name] / GB for name in libs)
            print(f"{fmt:7} {args.rev}: {old:6.2f} GB/s   working tree: {new:6.2f} GB/s   x{new / old:.2f}", flush=True)


if __name__ == "__main__":
    main()

"""Prints the SIMD targets numpy dispatches to on this machine, for NPY_DISABLE_CPU_FEATURES:
`make test` re-runs the byte-equality tests with them disabled (numpy's baseline only), so one
machine also checks the bytes a CPU without AVX2 / AVX-512 (or NEON extensions) computes."""

from __future__ import annotations

try:
    from numpy._core._multiarray_umath import __cpu_dispatch__, __cpu_features__
except ImportError:   # numpy 1.x
    from numpy.core._multiarray_umath import __cpu_dispatch__, __cpu_features__

if __name__ == "__main__":
    print(" ".join(f for f in __cpu_dispatch__ if __cpu_features__.get(f)))

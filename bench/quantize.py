"""nemoq quantize vs llama.cpp's llama_model_quantize, on the trained tiny model (not in CI).

For each recipe, from the same F16 GGUF and with the same thread count: wall time, file size,
bits per weight, and the KL divergence of each output against the F16 model's logits
(llama.cpp runs every file, through llama-cpp-python), over held-out text. Also times
nemoq's one pass from the checkpoint against convert + quantize.

    .venv/bin/python bench/quantize.py [--chunks 8] [--ctx 256] [--threads 2] [--json FILE]
    .venv/bin/python bench/quantize.py --full-width     # speed only, on bench/convert.py's 4 GB ME* checkpoint
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nemoq.convert.pipeline import float_chooser, open_source, write_gguf  # noqa: E402
from nemoq.gguf_file import read_gguf  # noqa: E402
from nemoq.quant.recipes import RECIPES, chooser, plan_types  # noqa: E402

MODEL = ROOT / "tests" / "data" / "nemotron-tiny"
# recipe -> llama.cpp ftype (None: llama_model_quantize cannot make it)
LLAMA_FTYPES = {"Q8_0": 7, "Q4_K_M": 15, "IQ4_NL": 25, "MXFP4_MOE": 38, "NQ4": None, "NVFP4": None}


def held_out_text() -> str:
    sys.path.insert(0, str(ROOT))
    from tests.fixtures.corpus import load_texts
    return "\n\n".join(load_texts("val"))


def nemoq_quantize(src: Path, out: Path, recipe: str) -> float:
    start = time.perf_counter()
    source = open_source(src)
    typed = plan_types([t.spec for t in source.plan.tensors], RECIPES[recipe], source.layer_kinds)
    write_gguf(source, out, chooser(typed), RECIPES[recipe].file_type, force=True)
    return time.perf_counter() - start


def llama_quantize(src: Path, out: Path, ftype: int, threads: int) -> float:
    import llama_cpp
    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread, params.ftype = threads, ftype
    start = time.perf_counter()
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize returned {rc}")
    return time.perf_counter() - start


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def chunk_logprobs(gguf_path: Path, chunks: list[list[int]]) -> list[np.ndarray]:
    from llama_cpp import Llama
    n_ctx = len(chunks[0])
    llm = Llama(str(gguf_path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=True, verbose=False,
                n_threads=2)
    out = []
    for ids in chunks:
        llm.reset()
        llm.eval(ids)
        out.append(log_softmax(np.array(llm.scores[:n_ctx], dtype=np.float64)[n_ctx // 2:]))  # second half
    llm.close()
    return out


def kld_stats(base: list[np.ndarray], ours: list[np.ndarray]) -> dict:
    kld = np.concatenate([(np.exp(b) * (b - q)).sum(-1) for b, q in zip(base, ours)])
    top1 = np.concatenate([b.argmax(-1) == q.argmax(-1) for b, q in zip(base, ours)])
    return {"kld_mean": float(kld.mean()), "kld_p99": float(np.quantile(kld, 0.99)), "top1": float(top1.mean())}


def full_width(threads: int, recipes: list[str]) -> None:
    """Speed and size on the full-width synthetic checkpoint (random weights: no KLD)."""
    sys.path.insert(0, str(ROOT / "bench"))
    from synthetic import ensure_checkpoint
    src = ensure_checkpoint(ROOT / "bench" / ".cache", "ME*")
    with tempfile.TemporaryDirectory(dir=ROOT / "bench" / ".cache") as tmp:
        tmp = Path(tmp)
        f16 = tmp / "f16.gguf"
        t0 = time.perf_counter()
        source = open_source(src)
        choose, ftype = float_chooser("f16", "BF16")
        write_gguf(source, f16, choose, ftype)
        print(f"load average {os.getloadavg()}; F16 GGUF of {src.name} written in {time.perf_counter() - t0:.1f} s")
        for recipe in recipes:
            ours, theirs = tmp / "nemoq.gguf", tmp / "llama.gguf"
            a = nemoq_quantize(f16, ours, recipe)
            b = llama_quantize(f16, theirs, LLAMA_FTYPES[recipe], threads)
            sa, sb = read_gguf(ours), read_gguf(theirs)
            print(f"{recipe:10s} nemoq {a:7.1f} s {sa.total_bytes / 1e9:6.2f} GB {sa.bits_per_weight:5.2f} bpw | "
                  f"llama.cpp {b:7.1f} s {sb.total_bytes / 1e9:6.2f} GB {sb.bits_per_weight:5.2f} bpw | "
                  f"speed {b / a:.2f}x llama.cpp's")
            ours.unlink()
            theirs.unlink()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full-width", action="store_true")
    ap.add_argument("--recipes", default="Q8_0,MXFP4_MOE,Q4_K_M", help="with --full-width")
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if args.full_width:
        from nemoq import kernels_c
        kernels_c.THREADS = args.threads
        full_width(args.threads, args.recipes.split(","))
        return

    from tokenizers import Tokenizer
    ids = Tokenizer.from_file(str(MODEL / "tokenizer.json")).encode(held_out_text()).ids
    n = min(args.chunks, len(ids) // (args.ctx - 1))
    chunks = [[1] + ids[i * (args.ctx - 1):(i + 1) * (args.ctx - 1)] for i in range(n)]
    print(f"load average {os.getloadavg()}; {n} chunks of {args.ctx} tokens, KLD over the second halves")

    with tempfile.TemporaryDirectory(dir=ROOT / "bench") as tmp:
        tmp = Path(tmp)
        f16 = tmp / "f16.gguf"
        source = open_source(MODEL)
        choose, ftype = float_chooser("f16", "BF16")
        t0 = time.perf_counter()
        write_gguf(source, f16, choose, ftype)
        convert_s = time.perf_counter() - t0
        base = chunk_logprobs(f16, chunks)
        rows, figures = [], {}
        for recipe, llama_ftype in LLAMA_FTYPES.items():
            for tool in ("nemoq", "llama.cpp"):
                if tool == "llama.cpp" and llama_ftype is None:
                    continue
                out = tmp / f"{tool}-{recipe}.gguf"
                seconds = (nemoq_quantize(f16, out, recipe) if tool == "nemoq"
                           else llama_quantize(f16, out, llama_ftype, args.threads))
                contents = read_gguf(out)
                stats = kld_stats(base, chunk_logprobs(out, chunks))
                figures[f"{tool} {recipe}"] = dict(seconds=seconds, bytes=contents.total_bytes,
                                                   bpw=contents.bits_per_weight, **stats)
                rows.append((f"{tool} {recipe}", seconds, contents.total_bytes, contents.bits_per_weight, stats))
        one_pass = nemoq_quantize(MODEL, tmp / "one-pass.gguf", "Q4_K_M")
        two_step = convert_s + figures["nemoq Q4_K_M"]["seconds"]

    print(f"\n{'file':22s} {'seconds':>8s} {'bytes':>10s} {'bpw':>6s} {'KLD mean':>9s} {'KLD p99':>8s} {'top-1':>6s}")
    for name, seconds, nbytes, bpw, s in rows:
        print(f"{name:22s} {seconds:8.2f} {nbytes:10,d} {bpw:6.2f} {s['kld_mean']:9.5f} {s['kld_p99']:8.4f} "
              f"{s['top1']:6.3f}")
    for recipe, ftype in LLAMA_FTYPES.items():
        if ftype is not None:
            a, b = figures[f"nemoq {recipe}"], figures[f"llama.cpp {recipe}"]
            print(f"{recipe}: nemoq/llama.cpp time {a['seconds'] / b['seconds']:.2f}x, size "
                  f"{a['bytes'] / b['bytes']:.2f}x, KLD {a['kld_mean'] / max(b['kld_mean'], 1e-12):.2f}x")
    print(f"one pass checkpoint -> Q4_K_M {one_pass:.2f} s vs convert + quantize {two_step:.2f} s "
          f"({two_step / one_pass:.2f}x faster)")
    if args.json:
        args.json.write_text(json.dumps({"figures": figures, "one_pass_s": one_pass, "two_step_s": two_step,
                                         "load": os.getloadavg()}, indent=1))


if __name__ == "__main__":
    main()

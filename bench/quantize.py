"""nemoq quantize vs llama.cpp's llama_model_quantize, on the trained tiny model (not in CI).

For each recipe, from the same F16 GGUF and with the same thread count: wall time, file size,
bits per weight, and the KL divergence of each output against the F16 model's logits
(llama.cpp runs every file, through llama-cpp-python), over held-out text. Also times
nemoq's one pass from the checkpoint against convert + quantize.

    .venv/bin/python bench/quantize.py [--chunks 8] [--ctx 256] [--threads 2] [--json FILE]
    .venv/bin/python bench/quantize.py --full-width     # speed only, on bench/convert.py's 4 GB ME* checkpoint
    .venv/bin/python bench/quantize.py --full-width --imatrix   # both sides given the same (random) imatrix
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
from nemoq.calib.imatrix_file import read_imatrix  # noqa: E402
from nemoq.quant.recipes import RECIPES, plan_types  # noqa: E402
from nemoq.quant.choose import chooser

MODEL = ROOT / "tests" / "data" / "nemotron-tiny"
# recipe -> llama.cpp ftype (None: llama_model_quantize cannot make it)
LLAMA_FTYPES = {"Q8_0": 7, "Q4_K_M": 15, "IQ4_NL": 25, "MXFP4_MOE": 38, "NQ4": None, "NVFP4": None}


def corpus_text(splits=("val",)) -> str:
    sys.path.insert(0, str(ROOT))
    from tests.fixtures.corpus import load_texts
    return "\n\n".join(text for split in splits for text in load_texts(split))


def text_chunks(splits, n_max: int, ctx: int) -> list[list[int]]:
    from tokenizers import Tokenizer
    ids = Tokenizer.from_file(str(MODEL / "tokenizer.json")).encode(corpus_text(splits)).ids
    n = min(n_max, len(ids) // (ctx - 1))
    return [[1] + ids[i * (ctx - 1):(i + 1) * (ctx - 1)] for i in range(n)]


def nemoq_quantize(src: Path, out: Path, recipe: str, imatrix: Path | None = None,
                   tensor_scales: bool = True) -> float:
    start = time.perf_counter()
    source = open_source(src)
    typed = plan_types([t.spec for t in source.plan.tensors], RECIPES[recipe], source.layer_kinds,
                       tensor_scales=tensor_scales)
    weights = read_imatrix(imatrix) if imatrix else None
    write_gguf(source, out, chooser(typed, weights), RECIPES[recipe].file_type, force=True)
    return time.perf_counter() - start


def ggml_fp4_quantize(src: Path, out: Path, recipe: str) -> float:
    """nemoq's recipe, but its NVFP4/MXFP4 tensors made by ggml's own quantizer
    (ggml_quantize_chunk: round to nearest, no per-matrix scale), for llama_model_quantize
    refuses NVFP4 output."""
    from gguf import GGMLQuantizationType

    from nemoq.quant import encodings
    from tests.ggml_oracle import ggml_quantize
    nemoq_own = encodings.BlockEncoding.quantize

    def quantize(self, x, importance=None):
        if self.name in ("nvfp4", "mxfp4"):
            return ggml_quantize(x.reshape(-1, x.shape[-1]), GGMLQuantizationType[self.name.upper()])
        return nemoq_own(self, x, importance)
    encodings.BlockEncoding.quantize = quantize
    try:
        return nemoq_quantize(src, out, recipe, tensor_scales=False)
    finally:
        encodings.BlockEncoding.quantize = nemoq_own


def calibrate(out: Path) -> float:
    """nemoq calibrate on the corpus' training split (the default data); KLD uses the held-out split."""
    from nemoq.calib.calibrate import calibrate as run
    start = time.perf_counter()
    run(MODEL, out)
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


def llama_quantize_imatrix(src: Path, out: Path, ftype: int, imatrix: Path) -> float:
    """llama_model_quantize given nemoq's importance matrix, as llama-quantize passes one (2 threads)."""
    from tests.test_calib_cli import llama_quantize_with
    start = time.perf_counter()
    rc, log = llama_quantize_with(src, out, read_imatrix(imatrix), ftype)
    if rc:
        raise RuntimeError(f"llama_model_quantize failed: {log[-500:]}")
    return time.perf_counter() - start


def variants(f16: Path, imatrix: Path, threads: int):
    """(label, make(out) -> seconds) for every file the table compares."""
    for recipe, llama_ftype in LLAMA_FTYPES.items():
        yield f"nemoq {recipe}", lambda out, r=recipe: nemoq_quantize(f16, out, r)
        if llama_ftype is not None:
            yield f"llama.cpp {recipe}", lambda out, t=llama_ftype: llama_quantize(f16, out, t, threads)
        if recipe in ("NVFP4", "MXFP4_MOE"):
            yield f"ggml-fp4 {recipe}", lambda out, r=recipe: ggml_fp4_quantize(f16, out, r)
        if recipe in IMATRIX_RECIPES:
            yield f"nemoq {recipe} +imatrix", lambda out, r=recipe: nemoq_quantize(f16, out, r, imatrix)
        if recipe in IMATRIX_RECIPES and llama_ftype is not None:
            yield f"llama.cpp {recipe} +imatrix", lambda out, t=llama_ftype: llama_quantize_imatrix(f16, out, t, imatrix)


# (ours, theirs) pairs whose ratios are printed
RATIOS = [(f"nemoq {r}", f"llama.cpp {r}") for r, t in LLAMA_FTYPES.items() if t is not None] + [
    ("nemoq Q4_K_M +imatrix", "llama.cpp Q4_K_M"), ("nemoq Q4_K_M +imatrix", "nemoq Q4_K_M"),
    ("nemoq Q4_K_M +imatrix", "llama.cpp Q4_K_M +imatrix"), ("nemoq MXFP4_MOE +imatrix", "llama.cpp MXFP4_MOE +imatrix"),
    ("nemoq NVFP4", "ggml-fp4 NVFP4"), ("nemoq NVFP4 +imatrix", "ggml-fp4 NVFP4"),
    ("nemoq MXFP4_MOE +imatrix", "llama.cpp MXFP4_MOE"), ("nemoq NQ4 +imatrix", "llama.cpp Q4_K_M"),
]
IMATRIX_RECIPES = ("Q4_K_M", "MXFP4_MOE", "NQ4", "NVFP4")


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
    return {"kld_mean": float(kld.mean()), "kld_p99": float(np.quantile(kld, 0.99)), "top1": float(top1.mean()),
            "kld": kld}


def paired_difference(a: np.ndarray, b: np.ndarray) -> str:
    """mean(a - b) over the same tokens with its standard error: whether a KLD ratio is more
    than the noise of which tokens were scored."""
    d = a - b
    return f"{d.mean():+.5f} +- {d.std(ddof=1) / np.sqrt(d.size):.5f}"


def random_imatrix(source, path: Path) -> None:
    """An importance matrix for timing (the synthetic weights are random, so no real one):
    log-normal per-column statistics for every matrix llama.cpp would look up."""
    from nemoq.calib.imatrix_file import ImportanceMatrix, write_imatrix
    rng = np.random.default_rng(0)
    sums, counts = {}, {}
    for planned in source.plan.tensors:
        spec = planned.spec
        if spec.keep_f32 or len(spec.shape) < 2 or spec.name == "token_embd.weight":
            continue
        sums[spec.name] = rng.lognormal(0, 2, (spec.n_matrices, spec.row_width)).astype(np.float32)
        counts[spec.name] = np.ones(spec.n_matrices, np.float32)
    write_imatrix(path, ImportanceMatrix(sums, counts, chunk_count=1, chunk_size=1))


def full_width(threads: int, recipes: list[str], with_imatrix: bool = False) -> None:
    """Speed and size on the full-width synthetic checkpoint (random weights: no KLD); with
    --imatrix both quantizers get the same (random) importance matrix."""
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
        imatrix = None
        if with_imatrix:
            imatrix = tmp / "imatrix.gguf"
            random_imatrix(source, imatrix)
        for recipe in recipes:
            ours, theirs = tmp / "nemoq.gguf", tmp / "llama.gguf"
            a = nemoq_quantize(f16, ours, recipe, imatrix)
            sa = read_gguf(ours)
            line = f"{recipe:10s} nemoq {a:7.1f} s {sa.total_bytes / 1e9:6.2f} GB {sa.bits_per_weight:5.2f} bpw"
            ours.unlink()
            if LLAMA_FTYPES.get(recipe) is None:   # llama_model_quantize cannot make it
                print(f"{line} | llama.cpp cannot write {recipe}")
                continue
            b = (llama_quantize_imatrix(f16, theirs, LLAMA_FTYPES[recipe], imatrix) if imatrix
                 else llama_quantize(f16, theirs, LLAMA_FTYPES[recipe], threads))
            sb = read_gguf(theirs)
            print(f"{line} | llama.cpp {b:7.1f} s {sb.total_bytes / 1e9:6.2f} GB {sb.bits_per_weight:5.2f} bpw | "
                  f"speed {b / a:.2f}x llama.cpp's")
            theirs.unlink()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full-width", action="store_true")
    ap.add_argument("--recipes", default="Q8_0,MXFP4_MOE,Q4_K_M", help="with --full-width")
    ap.add_argument("--imatrix", action="store_true", help="with --full-width: both sides get a random imatrix")
    ap.add_argument("--chunks", type=int, default=44, help="at most (the held-out split has 44 of 256)")
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--no-wide", dest="wide", action="store_false",
                    help="skip the KLD over both splits for the files made without an imatrix")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if args.full_width:
        from nemoq import kernels_c
        with kernels_c.quantize_threads(args.threads):
            full_width(args.threads, args.recipes.split(","), args.imatrix)
        return

    chunks = text_chunks(("val",), args.chunks, args.ctx)
    # without an imatrix nothing has seen the training text: KLD over both splits, 8x the tokens
    wide = text_chunks(("train", "val"), 10_000, args.ctx) if args.wide else []
    print(f"load average {os.getloadavg()}; {len(chunks)} held-out chunks of {args.ctx} tokens"
          f"{f' ({len(wide)} over both splits without an imatrix)' if wide else ''}, KLD over the second halves")

    with tempfile.TemporaryDirectory(dir=ROOT / "bench") as tmp:
        tmp = Path(tmp)
        f16 = tmp / "f16.gguf"
        source = open_source(MODEL)
        choose, ftype = float_chooser("f16", "BF16")
        t0 = time.perf_counter()
        write_gguf(source, f16, choose, ftype)
        convert_s = time.perf_counter() - t0
        base = chunk_logprobs(f16, chunks)
        wide_base = chunk_logprobs(f16, wide) if wide else None
        imatrix = tmp / "imatrix.gguf"
        calibrate_s = calibrate(imatrix)
        rows, figures = [], {}
        for label, make in variants(f16, imatrix, args.threads):
            out = tmp / f"{label.replace(' ', '-')}.gguf"
            seconds = make(out)
            contents = read_gguf(out)
            stats = kld_stats(base, chunk_logprobs(out, chunks))
            figures[label] = dict(seconds=seconds, bytes=contents.total_bytes, bpw=contents.bits_per_weight, **stats)
            if wide and "+imatrix" not in label:
                figures[label]["wide_kld"] = kld_stats(wide_base, chunk_logprobs(out, wide))["kld"]
            stats = {k: v for k, v in stats.items() if k != "kld"}
            rows.append((label, seconds, contents.total_bytes, contents.bits_per_weight, stats))
        one_pass = nemoq_quantize(MODEL, tmp / "one-pass.gguf", "Q4_K_M")
        two_step = convert_s + figures["nemoq Q4_K_M"]["seconds"]

    print(f"\n{'file':22s} {'seconds':>8s} {'bytes':>10s} {'bpw':>6s} {'KLD mean':>9s} {'KLD p99':>8s} {'top-1':>6s}")
    for name, seconds, nbytes, bpw, s in rows:
        print(f"{name:22s} {seconds:8.2f} {nbytes:10,d} {bpw:6.2f} {s['kld_mean']:9.5f} {s['kld_p99']:8.4f} "
              f"{s['top1']:6.3f}")
    for ours, theirs in RATIOS:
        a, b = figures[ours], figures[theirs]
        print(f"{ours} / {theirs}: time {a['seconds'] / b['seconds']:.2f}x, size "
              f"{a['bytes'] / b['bytes']:.2f}x, KLD {a['kld_mean'] / max(b['kld_mean'], 1e-12):.2f}x "
              f"(difference {paired_difference(a['kld'], b['kld'])})")
    for ours, theirs in RATIOS if wide else ():
        a, b = figures[ours].get("wide_kld"), figures[theirs].get("wide_kld")
        if a is not None and b is not None:
            print(f"{ours} / {theirs}, both splits: KLD {a.mean() / max(b.mean(), 1e-12):.3f}x "
                  f"(difference {paired_difference(a, b)})")
    print(f"calibration (default corpus, train split): {calibrate_s:.1f} s")
    print(f"one pass checkpoint -> Q4_K_M {one_pass:.2f} s vs convert + quantize {two_step:.2f} s "
          f"({two_step / one_pass:.2f}x faster)")
    if args.json:
        figures = {k: {n: (float(v.mean()) if n == "wide_kld" else v) for n, v in f.items() if n != "kld"}
                   for k, f in figures.items()}
        args.json.write_text(json.dumps({"figures": figures, "one_pass_s": one_pass, "two_step_s": two_step,
                                         "load": os.getloadavg()}, indent=1))


if __name__ == "__main__":
    main()

"""What `nemoq quantize --calibrate` buys: KLD vs the F32 file on held-out text, per recipe, for
plain rounding, `--imatrix` (from `nemoq calibrate`) and `--calibrate` on the same tokens.

    .venv/bin/python bench/calibrated.py [--model tiny w256] [--recipes Q4_K_M IQ4_NL ...] [--tokens 65536]
                                         [--feeds FEED ...] [--no-llama] [--json FILE]

Models (bench/tiny_models.py): tiny, the bundled trained tests/data/nemotron-tiny (widths not
multiples of 256), and w256, a second trained model with every width a multiple of 256 (trained
into a cache when missing), or a checkpoint folder; each runs in turn. Calibration: the
corpus' train split (the default data of both commands); held-out text: its val split, which
shares no source item with it. Every held-out token after the first half chunk is scored: the
chunks of --eval-ctx tokens are scored in their second half, as llama-perplexity does, and once
more with the chunk starts shifted by half a chunk. Ratios of mean KLD come with a standard error
from the paired per-token differences (delta method: se(a/b) = sd(a_i - r b_i) / (sqrt(n) mean b)).

Times and peak RSS: `nemoq calibrate` and `nemoq quantize --calibrate`, each a child process on
the same tokens. --feeds also measures the walk with other inputs (nemoq.calib.walk.FEEDS: the
full-precision model's, the quantized model's, or both as asymmetric targets) against the default
(in process, untimed). Not part of the test suite.

With Q4_K_M among the recipes (unless --no-llama): llama.cpp's own Q4_K_M from llama-quantize,
with and without llama-imatrix's imatrix on the same calibration tokens and --ctx, from the same
F32 GGUF (bench/llama_q4km.py; the tools are built once, bench/llama_tools.py). Its tensor types
are llama.cpp's, so the file sizes differ from nemoq's: both are printed.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

from measure import git_state, spawn_timed  # noqa: E402
from tiny_models import model_path  # noqa: E402

RECIPES = ("Q4_K_M", "IQ4_NL", "NQ4", "NVFP4", "MXFP4_MOE", "Q6_K", "NQ5", "Q8_0")
NEMOQ = str(ROOT / ".venv" / "bin" / "nemoq")


def held_out_kld(base: Path, models: list[Path], text: str, ctx: int, threads: int = 1) -> list[np.ndarray]:
    """Per-token KLD(base || model) of each model over the held-out tokens (two chunk alignments).
    One llama.cpp thread by default: on a shared machine ggml's spinning threads made each
    evaluation several times slower, and a model this small gains nothing from more."""
    from nemoq.eval.metrics import kl_rows
    from nemoq.eval.model import LlamaModel

    with LlamaModel(base, ctx, threads) as m:
        tokens = m.tokenize(text)
        chunks = []
        for shift in (0, ctx // 2):
            layout = m.layout(len(tokens) - shift, ctx, None)
            chunks += [(layout.chunk(tokens[shift:], i), layout.first) for i in range(layout.n_chunks)]
        base_logp = [m.scored_logprobs(ids, first).astype(np.float32) for ids, first in chunks]
    klds = []
    for path in models:
        with LlamaModel(path, ctx, threads) as m:
            klds.append(np.concatenate([kl_rows(b.astype(np.float64), m.scored_logprobs(ids, first))
                                        for b, (ids, first) in zip(base_logp, chunks)]))
    return klds


def ratio(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """mean(a) / mean(b) and its standard error from the paired per-token values."""
    r = a.mean() / b.mean()
    return float(r), float((a - r * b).std(ddof=1) / (math.sqrt(len(a)) * b.mean()))


def run(argv: list, log: Path) -> tuple[float, float]:
    seconds, rss, code, _ = spawn_timed([str(a) for a in argv], log)
    if code != 0:
        raise SystemExit(f"{' '.join(map(str, argv[:3]))} failed ({code}):\n{log.read_text()}")
    return seconds, rss / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", nargs="+", default=["tiny"], help="tiny, w256 (bench/tiny_models.py) or a folder")
    ap.add_argument("--recipes", nargs="+", default=list(RECIPES))
    ap.add_argument("--tokens", type=int, default=65536)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--eval-ctx", type=int, default=256)
    ap.add_argument("--variants", nargs="+", default=["plain", "imatrix", "calibrate"])
    ap.add_argument("--feeds", nargs="*", default=[], metavar="FEED",
                    help="also the walk with these inputs (nemoq.calib.walk.FEEDS other than FEED)")
    ap.add_argument("--no-llama", action="store_true", help="skip llama.cpp's own Q4_K_M")
    ap.add_argument("--work", type=Path, default=ROOT / "bench" / ".cache" / "calibrated")
    ap.add_argument("--json", type=Path, help="write the figures to this file (one entry per model)")
    args = ap.parse_args()
    figures = {name: bench(args, name) for name in args.model}
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


def bench(args, which: str) -> dict:
    from tests.fixtures.corpus import load_texts
    model = model_path(which)
    work = args.work / model.name
    work.mkdir(parents=True, exist_ok=True)
    base = work / "base-F32.gguf"
    run([NEMOQ, "convert", model, "-o", base, "--outtype", "f32", "--force"], work / "convert.log")
    tokens = ["--tokens", args.tokens, "--ctx", args.ctx]
    imatrix = work / "imatrix.gguf"
    times = {"calibrate": run([NEMOQ, "calibrate", model, "-o", imatrix, "--force", *tokens],
                              work / "calibrate.log")}

    files: dict[tuple[str, str], Path] = {}
    for recipe in args.recipes:
        for variant in args.variants:
            out = work / f"{recipe}-{variant}.gguf"
            extra = {"plain": [], "imatrix": ["--imatrix", imatrix], "calibrate": ["--calibrate", *tokens]}[variant]
            seconds = run([NEMOQ, "quantize", model, "-o", out, "--recipe", recipe, "--force", *extra],
                          work / f"{recipe}-{variant}.log")
            times[f"{recipe} {variant}"] = seconds
            files[recipe, variant] = out
        for feed in args.feeds:
            from nemoq.calib.calibrated import quantize_calibrated
            from nemoq.quant.recipes import RECIPES as ALL
            out = work / f"{recipe}-{feed}.gguf"
            quantize_calibrated(model, out, ALL[recipe], tokens=args.tokens, ctx=args.ctx, force=True, feeds=feed)
            files[recipe, feed] = out

    from nemoq.gguf_file import read_gguf
    for recipe in args.recipes:   # same plan, same bytes per weight, whatever the rounding
        tables = {v: [(t.name, tuple(t.shape), t.type_name) for t in read_gguf(f).tensors]
                  for (r, v), f in files.items() if r == recipe}
        if len({repr(t) for t in tables.values()}) != 1:
            raise SystemExit(f"{recipe}: the files' tensor tables differ ({', '.join(tables)})")

    llama = None
    if "Q4_K_M" in args.recipes and not args.no_llama:
        from llama_q4km import llama_q4km
        llama = llama_q4km(base, model, work, args.ctx, args.tokens, run)
        times.update(llama["times"])
    extra = llama["files"] if llama else {}
    text = "\n\n".join(load_texts("val"))
    keys = list(files)
    klds = dict(zip(keys + list(extra), held_out_kld(base, [files[k] for k in keys] + list(extra.values()),
                                                      text, args.eval_ctx)))
    n = len(next(iter(klds.values())))
    print(f"{model.name}: KLD vs F32 over {n:,} held-out tokens; calibration {args.tokens:,} tokens "
          f"(x {args.ctx}) of the train split")
    figures = {"model": str(model), "held_out_tokens": n, "tokens": args.tokens, "ctx": args.ctx,
               "eval_ctx": args.eval_ctx, "recipes": {}, "times": {}, "code": git_state()}
    head = f"{'recipe':<11}{'bpw':>6}" + "".join(f"{v:>13}" for v in args.variants + args.feeds)
    print(head + f"{'cal/plain':>16}{'cal/imatrix':>16}" + "".join(f"{'cal/' + feed:>16}" for feed in args.feeds))
    for recipe in args.recipes:
        row = {v: float(klds[recipe, v].mean()) for (r, v) in keys if r == recipe}
        size = files[recipe, args.variants[0]].stat().st_size
        entry = {"kld": row, "kld_stderr": {v: float(klds[recipe, v].std(ddof=1) / math.sqrt(n)) for v in row},
                 "bytes": size}
        cells = "".join(f"{row[v]:>13.5f}" for v in row)
        pairs = [("calibrate", "plain"), ("calibrate", "imatrix")] + [("calibrate", feed) for feed in args.feeds]
        for a, b in pairs:
            if (recipe, a) in klds and (recipe, b) in klds:
                r, se = ratio(klds[recipe, a], klds[recipe, b])
                entry[f"{a}/{b}"] = [r, se]
                cells += f"{r:>10.3f} ±{se:.3f}"
        figures["recipes"][recipe] = entry
        weights = sum(int(np.prod(t.shape)) for t in read_gguf(files[recipe, args.variants[0]]).tensors)
        print(f"{recipe:<11}{8 * size / weights:>6.2f}{cells}")
    if llama:
        figures["llama.cpp"] = llama_rows(klds, files["Q4_K_M", args.variants[-1]], args.variants[-1], llama)
    for name, (seconds, rss) in times.items():
        figures["times"][name] = {"seconds": round(seconds, 1), "peak_rss_gb": round(rss, 3)}
    cal = [(k, v) for k, v in times.items() if k.endswith("calibrate")]
    print(f"nemoq calibrate: {times['calibrate'][0]:.1f} s, peak RSS {times['calibrate'][1]:.2f} GB")
    for name, (seconds, rss) in cal[1:]:
        print(f"quantize {name}: {seconds:.1f} s, peak RSS {rss:.2f} GB")
    for step, (seconds, rss) in times.items():
        if step.startswith("llama-"):
            print(f"{step}: {seconds:.1f} s, peak RSS {rss:.2f} GB")
    return figures


def llama_rows(klds: dict, ours_file: Path, ours: str, llama: dict) -> dict:
    """llama.cpp's Q4_K_M files against nemoq's Q4_K_M `ours` variant: KLD, sizes, ratios."""
    print(f"llama.cpp Q4_K_M (llama-imatrix on the same {llama['calibration_tokens']:,} calibration tokens; "
          f"{llama['mismatched_tokens']} of them tokenized differently by llama.cpp)")
    a = klds["Q4_K_M", ours]
    out = {"mismatched_tokens": llama["mismatched_tokens"],
           f"nemoq {ours}": {"kld": float(a.mean()), "bytes": ours_file.stat().st_size}}
    print(f"  nemoq {ours:<20}{a.mean():>10.5f}{ours_file.stat().st_size:>12,} bytes")
    for variant, path in llama["files"].items():
        b = klds[variant]
        r, se = ratio(a, b)
        out[variant] = {"kld": float(b.mean()), "kld_stderr": float(b.std(ddof=1) / math.sqrt(len(b))),
                        "bytes": path.stat().st_size, f"{ours}/{variant}": [r, se]}
        print(f"  {variant:<26}{b.mean():>10.5f}{path.stat().st_size:>12,} bytes   {ours}/{variant} {r:.3f} ±{se:.3f}")
    return out


if __name__ == "__main__":
    main()

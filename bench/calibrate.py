"""Benchmark `nemoq calibrate` on the full-width synthetic Nemotron 3 Nano checkpoint.

    .venv/bin/python bench/calibrate.py [--pattern 'ME*'] [--tokens 8192] [--ctx 512] [--json FILE]

Builds (once, reused) the checkpoint bench/convert.py uses: real widths (hidden 2688, 128 experts
x 1856, vocab 131072), layers of --pattern only (ME*: ~4.13 GB in BF16). Runs `nemoq calibrate`
as a child process with the sources warm in the page cache and reports wall time, tokens/s
(tokens x layers / time / layers: whole-model throughput) and peak RSS. Target: peak RSS <= 8 GB
(one MoE layer is ~2.55 GB in BF16). Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from measure import git_state, spawn_timed, warm  # noqa: E402
from synthetic import ensure_checkpoint, shards_of  # noqa: E402

RSS_TARGET = 8e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pattern", default="ME*")
    ap.add_argument("--cache-dir", type=Path, default=ROOT / "bench" / ".cache")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--json", type=Path, help="write the figures to this file")
    args = ap.parse_args()

    src = ensure_checkpoint(args.cache_dir, args.pattern)
    scratch = args.cache_dir / "scratch"
    scratch.mkdir(parents=True, exist_ok=True)
    out, log = scratch / "imatrix.gguf", scratch / "calibrate.log"
    warm_s = warm(shards_of(src))
    argv = [str(ROOT / ".venv" / "bin" / "nemoq"), "calibrate", str(src), "-o", str(out), "--force",
            "--tokens", str(args.tokens), "--ctx", str(args.ctx), "--device", args.device]
    seconds, rss, code, cpu = spawn_timed(argv, log)
    if code != 0:
        raise SystemExit(f"nemoq calibrate failed ({code}):\n{log.read_text()}")
    tokens = args.tokens // args.ctx * args.ctx
    figures = {"pattern": args.pattern, "tokens": tokens, "ctx": args.ctx, "seconds": round(seconds, 1),
               "tokens_per_s": round(tokens / seconds, 1), "peak_rss_gb": round(rss / 1e9, 2),
               "rss_target_gb": RSS_TARGET / 1e9, "cpu": cpu, "warm_read_s": round(warm_s, 1),
               "imatrix_bytes": out.stat().st_size, "code": git_state()}
    print(f"{'checkpoint':<12}{src.name}\n{'tokens':<12}{tokens:,} ({tokens // args.ctx} x {args.ctx})")
    print(f"{'':<12}{'wall s':>8}{'tokens/s':>10}{'peak RSS':>10}{'target':>8}")
    print(f"{'calibrate':<12}{seconds:>8.1f}{tokens / seconds:>10.1f}{rss / 1e9:>9.2f}G{'ok' if rss <= RSS_TARGET else 'OVER':>8}")
    print(f"child used {cpu['child_cores']} cores on average; log: {log}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()

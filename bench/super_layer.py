"""Convert and one-pass quantize a full-width synthetic Nemotron 3 Super layer: speed and peak RSS.

    .venv/bin/python bench/super_layer.py [--pattern E] [--cache-dir bench/.cache] [--no-llama] [--json FILE]

1. Builds once (bench/synthetic.py) a hub-layout checkpoint with the published Super widths
   (tests/data/nemotron-3-super: hidden 4096, vocab 131072, 512 experts of 2688 over a 1024
   latent, shared expert 5376) and only the layers of `--pattern` (`E`: one LatentMoE layer,
   1024 expert tensors of 5.5 MB, ~7.8 GB in BF16 with the embeddings and lm_head), no MTP block.
2. Times as child processes, the source warm in the page cache: `cp` of the shards,
   `nemoq convert --outtype bf16`, `nemoq quantize --recipe NQ4` (one pass from the checkpoint)
   and, when the llama-cpp-python 0.3.36 sdist is cached (tests/llama_converter.py), llama.cpp's
   `convert_hf_to_gguf.py --outtype bf16`. Peak RSS from /usr/bin/time (bench/measure.py).
3. Prints the figures against the issue's bound for convert and quantize (1.5 GB peak RSS).

Not part of the test suite. Run from the repository root.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
for p in (BENCH, ROOT):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from measure import clear, git_state, resident_fraction, settle, spawn_timed, warm  # noqa: E402
from synthetic import ensure_checkpoint, shards_of  # noqa: E402

SUPER_CONFIG = ROOT / "tests" / "data" / "nemotron-3-super" / "config.json"
MAX_RSS = 1.5e9   # the bound for convert and one-pass quantize


def nemoq_argv() -> list[str]:
    exe = Path(sys.executable).parent / "nemoq"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "nemoq.cli"]


def tools(src: Path, scratch: Path, llama: bool) -> dict[str, tuple[list[str], Path]]:
    shards = shards_of(src)
    out = {
        "cp": (["cp", *map(str, shards), str(scratch / "cp")], scratch / "cp"),
        "nemoq convert bf16": ([*nemoq_argv(), "convert", str(src), "-o", str(scratch / "bf16.gguf"),
                                "--outtype", "bf16", "--force"], scratch / "bf16.gguf"),
        "nemoq quantize NQ4": ([*nemoq_argv(), "quantize", str(src), "-o", str(scratch / "nq4.gguf"),
                                "--recipe", "NQ4", "--force"], scratch / "nq4.gguf"),
    }
    if llama:
        from tests.llama_converter import RUNNER, converter_dir
        converter = converter_dir()
        if converter is None:
            print("llama.cpp's converter: sdist not cached, skipped (tests/llama_converter.py)")
        else:
            out["llama.cpp convert bf16"] = (
                [sys.executable, "-c", RUNNER.format(src=str(converter)), str(src), "--outfile",
                 str(scratch / "llama-bf16.gguf"), "--outtype", "bf16"], scratch / "llama-bf16.gguf")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pattern", default="E", help="layer pattern of the synthetic checkpoint (E, ME*, ...)")
    ap.add_argument("--cache-dir", type=Path, default=ROOT / "bench" / ".cache")
    ap.add_argument("--no-llama", action="store_true", help="do not run llama.cpp's converter")
    ap.add_argument("--json", type=Path, help="write the figures to this file")
    args = ap.parse_args()

    base = {k: v for k, v in json.loads(SUPER_CONFIG.read_text()).items()
            if k not in ("hybrid_override_pattern", "num_hidden_layers")}
    base["num_nextn_predict_layers"] = 0   # the trunk layer alone
    src = ensure_checkpoint(args.cache_dir, args.pattern, base=base, model="super")
    shards = shards_of(src)
    source_bytes = sum(p.stat().st_size for p in shards)
    scratch = args.cache_dir / "super-scratch"
    scratch.mkdir(parents=True, exist_ok=True)
    rows = []
    for tool, (argv, out) in tools(src, scratch, not args.no_llama).items():
        clear(out)
        if tool == "cp":
            out.mkdir(parents=True)
        settle()
        warm(shards)
        fraction = resident_fraction(shards)
        env_threads = os.environ.get("OMP_NUM_THREADS")
        seconds, rss, rc, cpu = spawn_timed(argv, scratch / (tool.replace(" ", "_") + ".log"))
        written = sum(p.stat().st_size for p in ([*out.iterdir()] if out.is_dir() else [out]) if p.exists()) \
            if out.exists() else 0
        rows.append({"tool": tool, "seconds": round(seconds, 2), "peak_rss": rss, "rc": rc, "warm": round(fraction, 2),
                     "output_bytes": written, "cpu": cpu, "omp_threads": env_threads})
        print(f"{tool:<24} {seconds:7.1f} s  {source_bytes / seconds / 1e9:5.2f} GB/s of source  "
              f"peak RSS {rss / 1e9:5.2f} GB  rc {rc}  warm {fraction:.0%}  cores {cpu['child_cores']:.2f} "
              f"(others {cpu['other_cores']:.2f})", flush=True)
        clear(out)
    cp = next(r for r in rows if r["tool"] == "cp")
    print(f"\nsource {source_bytes / 1e9:.2f} GB ({len(shards)} shards), pattern {args.pattern}")
    for r in rows:
        bound = f", bound {MAX_RSS / 1e9:.1f} GB: {'ok' if r['peak_rss'] <= MAX_RSS else 'OVER'}" \
            if r["tool"].startswith("nemoq") else ""
        print(f"  {r['tool']:<24} {cp['seconds'] / r['seconds']:5.2f} x cp's speed, peak RSS "
              f"{r['peak_rss'] / 1e9:.2f} GB{bound}")
    if args.json:
        args.json.write_text(json.dumps({"git": git_state(), "pattern": args.pattern, "source_bytes": source_bytes,
                                         "runs": rows}, indent=2))


if __name__ == "__main__":
    main()

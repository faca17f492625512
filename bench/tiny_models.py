"""The trained tiny models the quality benches run on, by name, (re)trained when missing.

    .venv/bin/python bench/tiny_models.py [w256]      # train what is missing, print the paths

* tiny: tests/data/nemotron-tiny, committed (hidden 320, experts 192 / 384: like the real
  model, widths that are multiples of 64 but not of 256);
* w256: another seed and every width a multiple of 256 (hidden 256, experts 256 / 512), so
  that llama.cpp's k-quants apply to every tensor. Not committed: tests/fixtures/train_tiny.py
  --shape w256 --seed 1 --steps 400 trains it (half the committed model's 800 steps; 54 minutes on
  one thread of a busy shared machine; 1.9 s a step, about 13 minutes, on a quieter one) into
  $NEMOQ_BENCH_CACHE (default ~/.cache/nemoq-bench)/nemotron-tiny-256; its README.md, written
  last, records the training and says the model is complete.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("NEMOQ_BENCH_CACHE", Path.home() / ".cache" / "nemoq-bench"))

# name -> (folder, train_tiny arguments; None: committed, never trained here)
MODELS = {
    "tiny": (ROOT / "tests" / "data" / "nemotron-tiny", None),
    "w256": (CACHE / "nemotron-tiny-256", ["--shape", "w256", "--seed", "1", "--steps", "400"]),
}


def model_path(name_or_path: str) -> Path:
    """A named model's folder, trained first when it is missing; any other value is a path."""
    if name_or_path not in MODELS:
        path = Path(name_or_path)
        if not (path / "config.json").is_file():
            raise SystemExit(f"{path}: not a model folder (no config.json) nor one of {', '.join(MODELS)}")
        return path
    folder, train_args = MODELS[name_or_path]
    if (folder / "README.md").is_file() or train_args is None:
        return folder
    log = folder.with_suffix(".train.log")
    folder.parent.mkdir(parents=True, exist_ok=True)
    print(f"training {name_or_path} into {folder} (13-54 minutes on a shared machine; log {log})", file=sys.stderr, flush=True)
    with log.open("w") as out:
        done = subprocess.run([sys.executable, "-m", "tests.fixtures.train_tiny", *train_args, "--out", str(folder)],
                              cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    if done.returncode != 0 or not (folder / "README.md").is_file():
        raise SystemExit(f"training {name_or_path} failed ({done.returncode}); see {log}")
    return folder


if __name__ == "__main__":
    for name in sys.argv[1:] or list(MODELS):
        print(f"{name}: {model_path(name)}")

"""`nemoq quantize --target-size` on a trained tiny model (not in CI): the predictor's validation
and the file for each llama.cpp recipe's size.

    .venv/bin/python bench/target_size.py [--model tiny|w256|PATH] [--tokens 16384] [--mixes 10] [--profile P]
        [--calibrate] [--json FILE]

Models (bench/tiny_models.py): tiny, the bundled tests/data/nemotron-tiny (the default, as
bench/quantize.py), or w256, the second trained model with every width a multiple of 256.
Everything is made from one F16 GGUF of it: the profile (calibration: the corpus' train split),
llama.cpp's files (llama_model_quantize), nemoq's fixed recipes and the --target-size files. KLD
is against that F16 file, by llama.cpp, over the corpus' held-out val split (never calibration
text): chunks of --ctx tokens, each from a fresh state, every position from --first on scored
(>= 8192 tokens). Ratios come with a standard error
from the paired per-token values (bench/calibrated.py's ratio).

1. Predictor: --mixes random type mixes (nemoq.calib.predictor_check, as tests/test_profile.py
   checks it: profile.random_mixes, per mix a random preference over the candidate types, per
   tensor a type drawn from it; another seed than the profile's own fit mixes), predicted KLD from
   the profile vs measured; Spearman rank correlation and the median relative error.
2. For llama.cpp's Q4_K_M, Q5_K_M, Q6_K, IQ4_NL and MXFP4_MOE: --target-size of exactly that
   file's bytes, against llama.cpp's file and the best of nemoq's fixed recipes no larger than it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

from calibrated import ratio  # noqa: E402
from quantize import corpus_text, llama_quantize, nemoq_quantize  # noqa: E402
from tiny_models import model_path  # noqa: E402

from nemoq.calib.predictor_check import check_predictor, held_out_scorer  # noqa: E402
from nemoq.calib.profile import make_profile, read_profile, write_profile  # noqa: E402
from nemoq.calib.target import quantize_to_target  # noqa: E402
from nemoq.convert.pipeline import float_chooser, open_source, write_gguf  # noqa: E402
from nemoq.quant.recipes import RECIPES  # noqa: E402

LLAMA = {"Q4_K_M": 15, "Q5_K_M": 17, "Q6_K": 18, "IQ4_NL": 25, "MXFP4_MOE": 38}
FIXED = [name for name, r in RECIPES.items() if r.base not in ("f32", "f16", "bf16")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny", help="tiny, w256 (bench/tiny_models.py) or a model folder")
    ap.add_argument("--tokens", type=int, default=16384, help="profile calibration tokens")
    ap.add_argument("--sensitivity-tokens", type=int, default=1024)
    ap.add_argument("--mixes", type=int, default=10)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--first", type=int, default=64, help="first scored position of each held-out chunk")
    ap.add_argument("--profile", type=Path, help="reuse this profile (of the F16 GGUF the bench writes)")
    ap.add_argument("--profile-out", type=Path, help="keep the profile made here")
    ap.add_argument("--calibrate", action="store_true", help="also --target-size --calibrate files")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    model = model_path(args.model)
    print(f"{model}; load average {os.getloadavg()}")
    with tempfile.TemporaryDirectory(dir=ROOT / "bench") as tmp:
        tmp = Path(tmp)
        f16 = tmp / "f16.gguf"
        choose, ftype = float_chooser("f16", "BF16")
        write_gguf(open_source(model), f16, choose, ftype)
        source = open_source(f16)
        t0 = time.perf_counter()
        profile_path = tmp / "profile.json"
        if args.profile:
            profile = read_profile(args.profile)
            profile_path = args.profile
        else:
            profile = make_profile(f16, tokens=args.tokens, sensitivity_tokens=args.sensitivity_tokens,
                                   compensated=args.calibrate)
            write_profile(profile_path, profile)
            if args.profile_out:
                write_profile(args.profile_out, profile, force=True)
        profile_s = time.perf_counter() - t0
        scorer = held_out_scorer(f16, corpus_text(("val",)), ctx=args.ctx, first=args.first)
        n_tokens = len(scorer.kld_rows(f16))
        print(f"profile {profile_s:.0f} s, q = {profile.combine:.2f} ({profile.calibration['tokens']} tokens, "
              f"{profile.calibration['ablation_tokens_scored']} scored per ablation); "
              f"{n_tokens} held-out tokens scored")

        # 1. the predictor
        def mix_done(i, c):
            print(f"mix {i}: {c.sizes[i]:,} bytes, predicted {c.predicted[i]:.5f}, measured {c.measured[i]:.5f}",
                  flush=True)
        check = check_predictor(profile, source, scorer, tmp, mixes=args.mixes, seed=args.seed, on_mix=mix_done)
        rows = list(zip(check.predicted, check.measured, check.sizes))
        if rows:
            print(f"predictor: Spearman {check.spearman:.3f}, median relative error {check.median_error:.1%} "
                  f"(max {check.relative_errors.max():.1%})")

        # 2. the files at llama.cpp's sizes
        klds, sizes = {}, {}

        def measure(label: str, path: Path) -> None:
            sizes[label], klds[label] = os.path.getsize(path), scorer.kld_rows(path)
            print(f"{label:28s} {sizes[label]:>10,} bytes  KLD {klds[label].mean():.5f}", flush=True)

        for name in FIXED:
            path = tmp / f"nemoq-{name}.gguf"
            nemoq_quantize(f16, path, name)
            measure(f"nemoq {name}", path)
        table = []
        for name, ftype in LLAMA.items():
            theirs = tmp / f"llama-{name}.gguf"
            llama_quantize(f16, theirs, ftype, 2)
            measure(f"llama.cpp {name}", theirs)
            budget = sizes[f"llama.cpp {name}"]
            variants = [("", False)] + ([(" --calibrate", True)] if args.calibrate else [])
            for suffix, calibrate in variants:
                ours = tmp / f"target-{name}{suffix.strip()}.gguf"
                r = quantize_to_target(f16, ours, target_size=budget, profile_path=profile_path, calibrate=calibrate,
                                       calibrate_options={"tokens": args.tokens} if calibrate else None)
                label = f"target {name}{suffix}"
                measure(label, ours)
                assert sizes[label] <= budget
                fixed = [f for f in FIXED if sizes[f"nemoq {f}"] <= budget]
                best = min(fixed, key=lambda f: klds[f"nemoq {f}"].mean()) if fixed else None
                vs_llama = ratio(klds[label], klds[f"llama.cpp {name}"])
                vs_fixed = ratio(klds[label], klds[f"nemoq {best}"]) if best else (float("nan"), float("nan"))
                table.append(dict(recipe=name, variant=suffix.strip() or "plain", budget=budget, size=sizes[label],
                                  kld=float(klds[label].mean()), predicted=r.plan.kld,
                                  llama_kld=float(klds[f"llama.cpp {name}"].mean()), vs_llama=vs_llama, best_fixed=best,
                                  best_fixed_size=sizes.get(f"nemoq {best}"),
                                  best_fixed_kld=float(klds[f"nemoq {best}"].mean()) if best else None,
                                  vs_fixed=vs_fixed))

    print(f"\n{'size of':10s} {'variant':11s} {'bytes':>10s} {'KLD':>8s} {'predicted':>9s} {'llama.cpp':>9s} "
          f"{'ratio':>13s} {'best fixed nemoq':>18s} {'KLD':>8s} {'ratio':>13s}")
    for t in table:
        print(f"{t['recipe']:10s} {t['variant']:11s} {t['size']:>10,} {t['kld']:8.5f} {t['predicted']:9.5f} "
              f"{t['llama_kld']:9.5f} {t['vs_llama'][0]:6.3f}+-{t['vs_llama'][1]:.3f} {str(t['best_fixed']):>18s} "
              f"{t['best_fixed_kld'] or float('nan'):8.5f} {t['vs_fixed'][0]:6.3f}+-{t['vs_fixed'][1]:.3f}")
    if args.json:
        args.json.write_text(json.dumps({
            "model": str(model), "held_out_tokens": n_tokens, "profile_seconds": profile_s,
            "calibration": profile.calibration, "combine": profile.combine,
            "mixes": [dict(predicted=float(p), measured=float(m), bytes=int(b)) for p, m, b in rows],
            "spearman": check.spearman if rows else None,
            "median_relative_error": check.median_error if rows else None,
            "sizes": sizes, "kld": {k: float(v.mean()) for k, v in klds.items()}, "table": table,
            "load": os.getloadavg()}, indent=1))


if __name__ == "__main__":
    main()

"""Where a quantized file's KLD comes from: one tensor class quantized at a time, the rest F32.

    .venv/bin/python bench/attribution.py --work DIR --recipe IQ4_NL [--variants plain imatrix calibrate]

Reads the files bench/calibrated.py leaves in --work (base-F32.gguf and RECIPE-VARIANT.gguf) and
splices, for each class below, a file whose tensors of that class (with their `.scale`
companions) come from the quantized file and every other tensor from the F32 file. With
full-precision calibration inputs (the walk's default) a tensor's bytes do not depend on which
other tensors are quantized, so the splice is the file a recipe quantizing only that class
would write. Each splice is scored as bench/calibrated.py scores a file (KLD vs F32 on the val
split, two chunk alignments); ratios come with their paired standard errors.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import gguf
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

from calibrated import held_out_kld, ratio  # noqa: E402

CLASSES = {   # class -> pattern over GGUF tensor names (the `.scale` companions follow)
    "token_embd": r"^token_embd\.weight$",
    "output": r"^output\.weight$",
    "mamba_in": r"\.ssm_in\.weight$",
    "mamba_out": r"\.ssm_out\.weight$",
    "attention": r"\.attn_(q|k|v|output)\.weight$",
    "shared_expert": r"_shexp\.weight$",
    "routed_experts": r"_exps\.weight$",
}


def splice(base: Path, quantized: Path, pattern: str, out: Path) -> int:
    """Write `out`: base's metadata and tensors, those matching `pattern` (and their companions)
    from `quantized`. Returns how many tensors came from `quantized`."""
    b, q = gguf.GGUFReader(base), gguf.GGUFReader(quantized)
    take = re.compile(pattern)
    picked = {t.name: t for t in q.tensors if take.search(t.name.removesuffix(".scale"))}
    w = gguf.GGUFWriter(out, arch=None)
    for field in b.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.alignment":
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(field.name, field.contents(), vtype, sub)
    names = [t.name for t in b.tensors]
    extra = [n for n in picked if n not in names]
    for t in [*(picked.get(n, bt) for n, bt in zip(names, b.tensors)), *(picked[n] for n in extra)]:
        # quantized data comes as (..., bytes per row): gguf-py infers the shape from it
        w.add_tensor(t.name, np.asarray(t.data), raw_dtype=gguf.GGMLQuantizationType(t.tensor_type))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return len(picked)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=ROOT / "bench" / ".cache" / "calibrated")
    ap.add_argument("--recipe", required=True)
    ap.add_argument("--variants", nargs="+", default=["plain", "imatrix", "calibrate"])
    ap.add_argument("--classes", nargs="+", default=list(CLASSES))
    ap.add_argument("--eval-ctx", type=int, default=256)
    args = ap.parse_args()

    from tests.fixtures.corpus import load_texts
    base = args.work / "base-F32.gguf"
    files, keys = [], []
    for cls in args.classes:
        for v in args.variants:
            out = args.work / "splice" / f"{args.recipe}-{v}-{cls}.gguf"
            out.parent.mkdir(exist_ok=True)
            if splice(base, args.work / f"{args.recipe}-{v}.gguf", CLASSES[cls], out):
                files.append(out)
                keys.append((cls, v))
    text = "\n\n".join(load_texts("val"))
    klds = dict(zip(keys, held_out_kld(base, files, text, args.eval_ctx)))
    n = len(next(iter(klds.values())))
    print(f"{args.recipe}: KLD vs F32 over {n:,} held-out tokens, one class quantized at a time")
    pairs = [(v, "imatrix") for v in args.variants if v not in ("plain", "imatrix")]
    print(f"{'class':<16}" + "".join(f"{v:>12}" for v in args.variants) + "".join(f"{a + '/' + b:>20}" for a, b in pairs))
    for cls in args.classes:
        if (cls, args.variants[0]) not in klds:
            continue
        cells = "".join(f"{klds[cls, v].mean():>12.5f}" for v in args.variants)
        for a, b in pairs:
            r, se = ratio(klds[cls, a], klds[cls, b])
            cells += f"{r:>14.3f} ±{se:.3f}"
        print(f"{cls:<16}{cells}")


if __name__ == "__main__":
    main()

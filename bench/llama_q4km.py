"""llama.cpp's own Q4_K_M for bench/calibrated.py: llama-imatrix on nemoq's calibration tokens, then
llama-quantize with and without that imatrix, both from the same F32 GGUF nemoq's KLD is measured against.

Same tokens: the calibration text is written as nemoq lays it out (bench/calibrated.py's model, the
corpus' train split, each rendered document followed by the end-of-sequence token's text) and read
by llama-imatrix with --parse-special, so that llama.cpp's tokenizer gives back the ids of nemoq's
sequences; llama-imatrix then cuts the same --ctx chunks, as many as nemoq uses. check_tokens says
whether the ids agree; the tiny models add no BOS, so no chunk start is rewritten on either side.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from llama_tools import build

THREADS = 1   # as the benches run nemoq (OMP_NUM_THREADS=1), so the times compare


def calibration_text(model: Path, ctx: int, tokens: int) -> tuple[str, np.ndarray]:
    """(the text nemoq's calibration sequences tokenize from, those sequences (n, ctx))."""
    from nemoq.calib.calibrate import calibration_sequences
    from nemoq.calib.data import load_items
    from nemoq.calib.sequences import checkpoint_text
    from nemoq.convert.pipeline import open_source

    sequences, _ = calibration_sequences(open_source(model), None, ctx, tokens)
    text = checkpoint_text(model)
    if text.add_bos:
        raise SystemExit(f"{model}: the tokenizer adds BOS; this comparison assumes it does not")
    parts, count = [], 0
    for item in load_items(None)[0]:   # make_sequences' loop, keeping the text instead of the ids
        for rendered in text.render(item):
            parts.append(rendered + text.eos[0])
            count += len(text.encode(rendered)) + 1
        if count >= sequences.size:
            break
    return "".join(parts), sequences


def check_tokens(base: Path, text: str, sequences: np.ndarray) -> int:
    """How many of nemoq's calibration ids llama.cpp's tokenizer (as llama-imatrix runs it) gives differently."""
    from llama_cpp import Llama

    from nemoq.llama_tokens import tokenize
    llm = Llama(str(base), vocab_only=True, verbose=False)
    ids = np.asarray(tokenize(llm, text.encode("utf-8"), True, True)[: sequences.size])
    if len(ids) < sequences.size:
        return sequences.size - len(ids) + int((ids != sequences.ravel()[: len(ids)]).sum())
    return int((ids != sequences.ravel()).sum())


def llama_q4km(base: Path, model: Path, work: Path, ctx: int, tokens: int, run) -> dict:
    """Build the tools if needed, write the calibration text, run llama-imatrix and llama-quantize.

    `run(argv, log)` runs one child (bench/calibrated.py's, timed). Returns the two Q4_K_M files
    ("llama.cpp" without an imatrix, "llama.cpp imatrix" with one), the mismatched token count and
    the tools' (seconds, peak RSS GB).
    """
    tools = build()
    text, sequences = calibration_text(model, ctx, tokens)
    text_file = work / "calibration.txt"
    text_file.write_text(text, encoding="utf-8")
    imatrix = work / "llama-imatrix.gguf"
    times = {"llama-imatrix": run([tools["llama-imatrix"], "-m", base, "-f", text_file, "-o", imatrix,
                                   "-c", ctx, "-b", ctx, "--chunks", sequences.shape[0], "--parse-special",
                                   "-t", THREADS, "--no-ppl"], work / "llama-imatrix.log")}
    files = {}
    for variant, extra in (("llama.cpp", []), ("llama.cpp imatrix", ["--imatrix", imatrix])):
        out = work / f"Q4_K_M-{variant.replace(' ', '-').replace('.', '')}.gguf"
        times[f"llama-quantize {variant}"] = run([tools["llama-quantize"], *extra, base, out, "Q4_K_M", THREADS],
                                                 work / f"{out.stem}.log")
        files[variant] = out
    return {"files": files, "mismatched_tokens": check_tokens(base, text, sequences),
            "calibration_tokens": int(sequences.size), "times": times}

"""`nemoq profile`: per tensor and candidate type, the bytes and the predicted KLD.

One layer-streamed pass (walk.py's LayerWalk, full-precision inputs) gives every quantized
matrix its H = sum x x^T on the calibration tokens (per routed expert); each candidate type's
output error ||(W - Q) X||^2 is measured through it (nemoq.quant.type_errors), with plain rounding
and, with `compensated`, with `--calibrate`'s rounding. The embeddings are a row lookup: their
error is each row's squared error weighted by how often the calibration text uses the row.
Then a few one-tensor ablations per tensor turn errors into KLD: the tensor alone rounded to its
least, its most and a middle-error type, each such file's KLD measured as one more stream of the
layer-streamed forward (ablations.py: llama.cpp's own KLD of the file to 3-4 digits, without
writing it).
Between those points, a tensor's KLD is interpolated as a power of its relative output error e
(straight lines in log e / log KLD, the end segments extended), and the file's KLD is the sum:

    predicted KLD of a file = sum over tensors t of  KLD_t(e_t(type_t)).

A single quadratic KLD = c e^2 (the small-error limit) missed by up to 2x on the bundled model:
a Mamba input projection's KLD grew as e^1.2, and llama.cpp's 8-bit activations for quantized
matmuls add a floor that only matters at Q8_0. The profile records the model it was made from
(config, tensor names and shapes, a digest of the output norm), so it is refused for any other.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from nemoq.calib.calibrate import DEFAULT_CTX, calibration_sequences, pick_device
from nemoq.calib.forward import Progress
from nemoq.calib.hparams import config_of
from nemoq.calib.ablations import streamed_klds
from nemoq.calib.sensitivity import CTX as SENSITIVITY_CTX, DEFAULT_TOKENS as SENSITIVITY_TOKENS, FIRST, plain_text
from nemoq.calib.walk import LayerWalk, Target
from nemoq.calib.weights import read_tensor
from nemoq.convert.dtypes import block_size, type_nbytes
from nemoq.convert.pipeline import Source, open_source
from nemoq.errors import NemoqError
from nemoq.files import atomic_outputs, claim_output
from nemoq.quant.compensate import Compensated
from nemoq.quant.encodings import BLOCK_ENCODINGS
from nemoq.quant.recipes import stays_f32
from nemoq.quant.tensor_scale import takes_scale
from nemoq.quant.type_errors import CANDIDATE_TYPES, TypeError2, matrix_errors, plain_values

FORMAT, VERSION = "nemoq-profile", 1
DEFAULT_TOKENS = 16384
EMBEDDINGS = "token_embd.weight"


@dataclass
class TensorProfile:
    name: str
    shape: tuple[int, ...]
    tokens: int = 0
    energy: float = 0.0                          # tr(W H W^T) summed over matrices
    errors: dict[str, TypeError2] = field(default_factory=dict)
    ablations: dict[str, float] = field(default_factory=dict)   # type -> KLD with only this tensor in it

    def error(self, type_name: str, compensated: bool = False) -> float:
        """Relative output error ||(W - Q) X|| / ||W X||."""
        e = self.errors[type_name]
        sq = e.compensated if compensated and e.compensated is not None else e.plain
        return float(np.sqrt(sq / self.energy)) if self.energy > 0 else 0.0

    def predicted(self, type_name: str, compensated: bool = False) -> float:
        """This tensor's KLD share in `type_name`, from its ablation curve."""
        return kld_curve([(self.error(t), k) for t, k in self.ablations.items()], self.error(type_name, compensated))


def combined(shares: list[float], q: float) -> float:
    """A file's KLD from its tensors' one-tensor KLDs: (sum k^(1/q))^q. q = 1 adds them; measured
    whole-model mixes on the bundled model came out at 0.6x the sum (q < 1: errors in many tensors
    at once cost less than the sum of each alone). Monotone in sum k^(1/q), so the allocator
    minimises that sum."""
    return float(sum(k ** (1 / q) for k in shares) ** q)


def kld_curve(points: list[tuple[float, float]], e: float) -> float:
    """KLD at relative error e through measured (error, KLD) points: piecewise linear in log-log,
    the end segments extended; one point: KLD = c e^2."""
    pts = sorted((np.log(x), np.log(max(k, 1e-12))) for x, k in points if x > 0)
    if not pts or e <= 0:
        return 0.0
    x = np.log(e)
    if len(pts) == 1:
        return float(np.exp(pts[0][1] + 2 * (x - pts[0][0])))
    i = int(np.clip(np.searchsorted([p[0] for p in pts], x), 1, len(pts) - 1))
    (x0, y0), (x1, y1) = pts[i - 1], pts[i]
    slope = (y1 - y0) / (x1 - x0) if x1 > x0 else 2.0
    return float(np.exp(y0 + slope * (x - x0)))


@dataclass
class Profile:
    model: dict                                  # identity: config digest, norm digest, tensor shapes
    tensors: dict[str, TensorProfile]
    calibration: dict
    compensated: bool                            # errors of --calibrate's rounding were measured too
    combine: float = 1.0                         # q of combined(); fitted on whole-model mixes
    fits: list = field(default_factory=list)     # the mixes q was fitted on: {"types", "kld"}
    scale: float = 1.0                           # the fit mixes' KLD on FIT_TOKENS over the ablations' text's

    def predicted(self, types: dict[str, str], compensated: bool = False) -> float:
        shares = [self.tensors[n].predicted(t, compensated) for n, t in types.items()]
        return self.scale * combined(shares, self.combine)

    def kld_of_cost(self, cost: float) -> float:
        """A file's predicted KLD from the allocator's cost, the sum of its tensors' k^(1/q)."""
        return self.scale * cost ** self.combine

    def to_json(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "model": self.model, "calibration": self.calibration,
                "compensated": self.compensated, "combine": self.combine, "scale": self.scale, "fits": self.fits,
                "tensors": {n: {
                    "shape": list(t.shape), "tokens": t.tokens, "energy": t.energy, "ablations": t.ablations,
                    "types": {k: {"bytes": type_nbytes(k, t.shape), "error": t.error(k),
                                  "error_compensated": t.error(k, True) if e.compensated is not None else None,
                                  "squared": e.plain, "squared_compensated": e.compensated}
                              for k, e in t.errors.items()}} for n, t in self.tensors.items()}}


def read_profile(path: Path) -> Profile:
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
        if doc.get("format") != FORMAT or doc.get("version") != VERSION:
            raise NemoqError(f"not a nemoq profile (format {FORMAT} version {VERSION})", path)
        tensors = {n: TensorProfile(n, tuple(t["shape"]), t["tokens"], t["energy"],
                                    {k: TypeError2(e["squared"], e["squared_compensated"])
                                     for k, e in t["types"].items()},
                                    dict(t["ablations"]))
                   for n, t in doc["tensors"].items()}
        return Profile(doc["model"], tensors, doc["calibration"], doc["compensated"], doc["combine"], doc["fits"],
                       doc.get("scale", 1.0))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise NemoqError(f"cannot read the profile ({type(e).__name__}: {e})", path) from None


def write_profile(path: Path, profile: Profile, force: bool = False) -> None:
    with atomic_outputs(path, force) as tmp:
        Path(tmp).write_text(json.dumps(profile.to_json(), indent=1), encoding="utf-8")


# --- the model a profile belongs to --------------------------------------------------------------


def profiled_specs(source: Source) -> list:
    """The tensors a profile covers: every one a recipe may quantize."""
    return [t.spec for t in source.plan.tensors if not stays_f32(t.spec)]


def identity(source: Source) -> dict:
    cfg = config_of(source)
    fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name not in ("path", "raw")}
    norm = next(t for t in source.plan.tensors if t.name == "output_norm.weight")
    return {"config_sha256": hashlib.sha256(repr(sorted(fields.items())).encode()).hexdigest(),
            "output_norm_sha256": hashlib.sha256(read_tensor(norm).float().numpy().tobytes()).hexdigest(),
            "tensors": {s.name: list(s.shape) for s in profiled_specs(source)}}


def check_profile(profile: Profile, source: Source, path: Path) -> None:
    """Refuses a profile made from another model (or another version of this one's weights)."""
    mine = identity(source)
    for key, what in (("tensors", "tensor names or shapes"), ("config_sha256", "configuration"),
                      ("output_norm_sha256", "weights (output norm)")):
        if profile.model.get(key) != mine[key]:
            raise NemoqError(f"the profile is of another model: its {what} differ from {source.path}'s; "
                             f"make one for this model with nemoq profile", path)


def candidate_types(spec) -> tuple[str, ...]:
    """The candidate types whose block divides the tensor's row width."""
    return tuple(t for t in CANDIDATE_TYPES if spec.row_width % block_size(t) == 0)


# --- the walk ------------------------------------------------------------------------------------


class ProfileWalk(LayerWalk):
    """The calibrated walk, measuring every candidate type of each matrix instead of rounding it
    one way: the tensors' own bytes are not wanted (full-precision inputs, so nothing downstream
    depends on how a matrix was rounded)."""

    def __init__(self, source: Source, sequences: np.ndarray, device: torch.device, compensated: bool,
                 on_progress: Callable[[Progress], None] | None = None):
        self.specs = {s.name: s for s in profiled_specs(source) if s.name != EMBEDDINGS}
        self.compensated = compensated
        self.profiles = {n: TensorProfile(n, s.shape) for n, s in self.specs.items()}
        targets = {n: Target("q8_0", False) for n, s in self.specs.items() if s.row_width % 32 == 0}
        super().__init__(source.plan, config_of(source), sequences, targets, device=device, feeds="full-precision",
                         on_progress=on_progress)

    def _compensate(self, *args, **kwargs):
        """--calibrate's rounding as the walk does it: its fast path on the walk's device."""
        from nemoq.calib import compensate_torch
        return compensate_torch.compensated_quantize(*args, device=self.device, **kwargs)

    def quantize_matrix(self, name: str, matrix: torch.Tensor, gram, importance: np.ndarray | None = None,
                        inputs: torch.Tensor | None = None):
        spec, p = self.specs[name], self.profiles[name]
        w = matrix.float().cpu().numpy()
        scaled = {t: takes_scale(spec, t) for t in CANDIDATE_TYPES}
        energy, errors = matrix_errors(w, gram.numpy(), candidate_types(spec), tokens=gram.tokens, scaled=scaled,
                                       compensated=self.compensated and gram.tokens > 0, importance=importance,
                                       inputs=None if inputs is None else inputs.float().cpu().numpy(),
                                       quantize=self._compensate)
        p.energy += energy
        p.tokens += gram.tokens
        for t, e in errors.items():
            total = p.errors.setdefault(t, TypeError2(0.0, 0.0 if self.compensated else None))
            total.plain += e.plain
            if total.compensated is not None:
                total.compensated += e.plain if e.compensated is None else e.compensated
        # what the walk itself wants back: some blocks (plain Q8_0; unused downstream)
        blocks = BLOCK_ENCODINGS["q8_0"].quantize(w)
        return Compensated(blocks, 0.0, 0.0, energy, float("nan")), None, matrix


def embedding_profile(source: Source, spec, sequences: np.ndarray) -> TensorProfile:
    """The embeddings' errors: per row, squared error times how often the calibration text uses it."""
    planned = next(t for t in source.plan.tensors if t.name == spec.name)
    table = read_tensor(planned)
    uses = np.bincount(sequences.reshape(-1), minlength=table.shape[0])[:table.shape[0]].astype(np.float64)
    used = np.flatnonzero(uses)   # rows round on their own (no per-matrix scale): the unused ones weigh 0
    e, uses = table[torch.from_numpy(used)].float().numpy().astype(np.float64), uses[used]
    del table                     # Nano's: 1.4 GB in float32, and its float64 products were ~10 GB
    energy = float((uses * (e ** 2).sum(1)).sum())
    p = TensorProfile(spec.name, spec.shape, int(sequences.size), energy)
    for t in candidate_types(spec):
        d = e - plain_values(t, e.astype(np.float32), False)
        sq = float((uses * (d ** 2).sum(1)).sum())
        p.errors[t] = TypeError2(sq, sq)    # --calibrate rounds the embeddings plainly too
    return p


def ablation_types(p: TensorProfile) -> list[str]:
    """The quantized candidates with the least and the most error, and the one nearest their
    geometric mean: the ends and the middle of the tensor's KLD curve."""
    types = sorted((t for t in p.errors if t != "f16"), key=lambda t: (p.error(t), t))
    if len(types) < 3:
        return types
    middle = np.sqrt(p.error(types[0]) * p.error(types[-1]))
    mid = min(types[1:-1], key=lambda t: abs(np.log(max(p.error(t), 1e-30) / max(middle, 1e-30))))
    return [types[0], mid, types[-1]]


def measure_errors(source: Source, sequences: np.ndarray, device: torch.device, compensated: bool,
                   on_progress: Callable[[Progress], None] | None = None) -> dict[str, TensorProfile]:
    """Every profiled tensor's output errors per candidate type (sensitivities not yet set)."""
    walk = ProfileWalk(source, sequences, device, compensated, on_progress)
    try:
        walk.finish()
    finally:
        walk.close()
    tensors = {}
    for spec in profiled_specs(source):
        if spec.name == EMBEDDINGS:
            tensors[spec.name] = embedding_profile(source, spec, sequences)
        elif spec.name in walk.profiles and walk.profiles[spec.name].errors:
            tensors[spec.name] = walk.profiles[spec.name]
    return tensors


FIT_MIXES, FIT_SEED = 3, 1234
# The whole-model mixes are scored on more text than each ablation (their KLD sets the
# predictor's scale: 894 tokens of the corpus' first text ran ~0.8x the KLD of 8192)
FIT_TOKENS = 8192
COMBINE_RANGE = np.arange(0.5, 1.0001, 0.01)


def random_mixes(tensors: dict[str, TensorProfile], n: int, seed: int) -> list[dict[str, str]]:
    """Whole-model type mixes: per mix a random preference over the quantized types (Dirichlet),
    per tensor a type drawn from it among the tensor's candidates."""
    rng = np.random.default_rng(seed)
    types = sorted({t for p in tensors.values() for t in p.errors if t != "f16"})
    mixes = []
    for _ in range(n):
        weight = dict(zip(types, rng.dirichlet(np.full(len(types), 0.5))))
        mix = {}
        for name, p in tensors.items():
            cands = [t for t in p.errors if t != "f16"]
            w = np.array([weight[t] for t in cands]) + 1e-9
            mix[name] = str(rng.choice(cands, p=w / w.sum()))
        mixes.append(mix)
    return mixes


def fit_combine(tensors: dict[str, TensorProfile], fits: list[dict]) -> tuple[float, float]:
    """(q, scale) with scale * combined(k, q) nearest the measured whole-model mixes (least squares
    in log KLD; the scale is the mean log ratio for each q)."""
    if not fits:
        return 1.0, 1.0
    measured = np.log([max(f["kld"], 1e-12) for f in fits])

    def fit(q: float) -> tuple[float, float]:
        logs = np.log([combined([tensors[n].predicted(t) for n, t in f["types"].items()], q) for f in fits])
        shift = float(np.mean(measured - logs))
        return float(((measured - logs - shift) ** 2).sum()), shift
    q = float(min(COMBINE_RANGE, key=lambda q: fit(q)[0]))
    return q, float(np.exp(fit(q)[1]))


def set_sensitivities(source: Source, tensors: dict[str, TensorProfile], data: Path | None, tokens: int,
                      on_ablation: Callable[[int, int], None] | None = None, fit_mixes: int = FIT_MIXES,
                      device: torch.device = torch.device("cpu")) -> tuple[int, list[dict]]:
    """Each tensor's ablations (ablation_types) and `fit_mixes` whole-model mixes, measured as
    streams of the layer-streamed forward (ablations.py, llama.cpp's KLD to 3-4 digits); returns
    the tokens scored and the mixes with their KLD."""
    jobs = [(n, t) for n, p in tensors.items() for t in ablation_types(p)]
    klds, scored = mix_klds(source, [{n: t} for n, t in jobs], data, tokens=tokens, device=device,
                            on_progress=on_ablation)
    for (n, t), k in zip(jobs, klds):
        tensors[n].ablations[t] = k
    return scored, measure_fits(source, tensors, data, fit_mixes, device=device, on_progress=on_ablation)


def measure_fits(source: Source, tensors: dict[str, TensorProfile], data: Path | None, n: int = FIT_MIXES,
                 tokens: int = FIT_TOKENS, device: torch.device = torch.device("cpu"),
                 on_progress: Callable[[int, int], None] | None = None) -> list[dict]:
    """`n` random whole-model mixes and their KLD on `tokens` tokens of the calibration text."""
    mixes = random_mixes(tensors, n, FIT_SEED)
    klds, _ = mix_klds(source, mixes, data, tokens=tokens, device=device, on_progress=on_progress) if mixes else ([], 0)
    return [{"types": m, "kld": k} for m, k in zip(mixes, klds)]


def mix_klds(source: Source, mixes: list[dict[str, str]], data: Path | None, *, tokens: int, device: torch.device,
             on_progress: Callable[[int, int], None] | None = None) -> tuple[list[float], int]:
    """Per mix (tensor -> type, the rest at full precision) its mean KLD against the
    full-precision model on the calibration data's plain text, in sequences of SENSITIVITY_CTX
    scored from FIRST on; and the positions scored."""
    return streamed_klds(source, mixes, plain_text(data), tokens=tokens, ctx=SENSITIVITY_CTX,
                         first=min(FIRST, SENSITIVITY_CTX // 2), device=device, on_progress=on_progress)


def make_profile(src: str | Path, *, data: Path | None = None, tokens: int = DEFAULT_TOKENS, ctx: int = DEFAULT_CTX,
                 device: str = "auto", compensated: bool = False, sensitivity_tokens: int = SENSITIVITY_TOKENS,
                 on_progress: Callable[[Progress], None] | None = None,
                 on_ablation: Callable[[int, int], None] | None = None,
                 on_start: Callable[[int, int], None] | None = None) -> Profile:
    start = time.perf_counter()
    torch_device = pick_device(device)
    source = open_source(src)
    sequences, _ = calibration_sequences(source, data, ctx, tokens)
    if on_start is not None:
        on_start(sequences.shape[0], len(source.layer_kinds) + 1 + source.plan.mtp_layers)   # + head, MTP block
    tensors = measure_errors(source, sequences, torch_device, compensated, on_progress)
    scored, fits = set_sensitivities(source, tensors, data, sensitivity_tokens, on_ablation, device=torch_device)
    calibration = {"tokens": int(sequences.size), "ctx": ctx, "data": str(data) if data else "nemoq corpus",
                   "device": str(torch_device), "ablation_tokens_scored": scored,
                   "seconds": round(time.perf_counter() - start, 1)}
    q, scale = fit_combine(tensors, fits)
    return Profile(identity(source), tensors, calibration, compensated, q, fits, scale)


def profile_to_file(src: str | Path, out: Path, *, force: bool = False, **options) -> Profile:
    with claim_output(out, force) as out:
        profile = make_profile(src, **options)
        write_profile(out, profile, force)
    return profile

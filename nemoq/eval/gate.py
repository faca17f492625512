"""The CI gate: fixed limits (--max-ppl-ratio, --max-kld, --min-top1) and a comparison with a
previous run's JSON (--baseline).

A baseline check fails when the new value is worse than the baseline's by more than
`sigmas` combined standard errors, sqrt(se_new^2 + se_old^2), plus a tiny absolute slack so
two bit-identical runs always pass. Both runs must have scored the same tokens.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

from nemoq.errors import NemoqError

DEFAULT_SIGMAS = 2.0
ABS_SLACK = 1e-9


@dataclass(frozen=True)
class Check:
    name: str
    value: float
    limit: float
    passed: bool
    rule: str          # "<=" or ">=", how value relates to limit when it passes


# option name -> (label, section, key, rule); every limit needs a base (a KLD section)
LIMITS = {
    "max_ppl_ratio": ("ppl ratio (model / base)", "kld", "ppl_ratio", "<="),
    "max_kld": ("KLD mean", "kld", "kld_mean", "<="),
    "min_top1": ("top-1 agreement", "kld", "top1", ">="),
}

# (label, section, value key, stderr key, rule) compared with a baseline; "model" rows are used
# only when neither run has a base
BASELINE_KLD = (
    ("KLD mean vs baseline", "kld", "kld_mean", "kld_stderr", "<="),
    ("ln ppl ratio vs baseline", "kld", "ln_ppl_ratio", "ln_ppl_ratio_stderr", "<="),
    ("top-1 vs baseline", "kld", "top1", "top1_stderr", ">="),
)
BASELINE_PPL = (("ln ppl vs baseline", "model", "ln_ppl", "ln_ppl_stderr", "<="),)


def _passes(value: float, limit: float, rule: str) -> bool:
    return value <= limit if rule == "<=" else value >= limit


def check_limits(record: dict, limits: dict[str, float | None]) -> list[Check]:
    checks = []
    for option, limit in limits.items():
        if limit is None:
            continue
        label, section, key, rule = LIMITS[option]
        if record.get(section) is None:
            raise NemoqError(f"--{option.replace('_', '-')} needs a base model (--base or --base-logits)")
        value = record[section][key]
        checks.append(Check(label, value, limit, _passes(value, limit, rule), rule))
    return checks


def check_baseline(record: dict, baseline: dict, baseline_path: Path, sigmas: float = DEFAULT_SIGMAS) -> list[Check]:
    ours, theirs = record["data"], baseline.get("data", {})
    if ours.get("tokens_sha256") != theirs.get("tokens_sha256"):
        raise NemoqError(f"the baseline scored other tokens (--data, --ctx or --chunks differ: "
                         f"{theirs.get('chunks')} chunks of {theirs.get('ctx')} there, "
                         f"{ours['chunks']} of {ours['ctx']} here)", baseline_path)
    both_kld = record.get("kld") is not None and baseline.get("kld") is not None
    rows = BASELINE_KLD if both_kld else BASELINE_PPL
    checks = []
    for label, section, key, se_key, rule in rows:
        new, old = record[section], baseline.get(section) or {}
        if key not in old or se_key not in old:
            raise NemoqError(f"the baseline has no {section}.{key} / {section}.{se_key}", baseline_path)
        tolerance = sigmas * math.hypot(new[se_key], old[se_key]) + ABS_SLACK
        limit = old[key] + tolerance if rule == "<=" else old[key] - tolerance
        checks.append(Check(label, new[key], limit, _passes(new[key], limit, rule), rule))
    return checks


def with_gates(record: dict, checks: list[Check]) -> dict:
    return {**record, "gates": [asdict(c) for c in checks], "passed": all(c.passed for c in checks)}

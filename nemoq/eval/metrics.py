"""Per-token scores and their summaries, with llama-perplexity's formulas.

Every scored token contributes the candidate's negative log-likelihood (NLL) and, against a
base model, the base's NLL, KL(P_base || P_cand) and whether both put the same token first.
Means come with llama-perplexity's uncertainty: sqrt(var / (n - 1)), and 0 for n <= 10.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float64 (exact enough to sum 128k tiny terms)."""
    x = np.asarray(logits, dtype=np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def kl_rows(base_logp: np.ndarray, cand_logp: np.ndarray) -> np.ndarray:
    """KL(P || Q) per row from two log-softmax matrices; exactly 0 when they are equal."""
    return (np.exp(base_logp) * (base_logp - cand_logp)).sum(-1)


def top1(logp: np.ndarray) -> np.ndarray:
    return logp.argmax(-1)


def target_nll(logp: np.ndarray, targets: np.ndarray) -> np.ndarray:
    return -logp[np.arange(len(targets)), targets]


@dataclass
class TokenScores:
    """Per scored token: candidate NLL, and against a base: base NLL, KLD, same top-1."""
    nll: list[np.ndarray] = field(default_factory=list)
    nll_base: list[np.ndarray] = field(default_factory=list)
    kld: list[np.ndarray] = field(default_factory=list)
    same_top: list[np.ndarray] = field(default_factory=list)

    def add(self, nll, nll_base=None, kld=None, same_top=None) -> None:
        self.nll.append(np.asarray(nll, dtype=np.float64))
        for name, value in (("nll_base", nll_base), ("kld", kld), ("same_top", same_top)):
            if value is not None:
                getattr(self, name).append(np.asarray(value))

    def array(self, name: str) -> np.ndarray:
        parts = getattr(self, name)
        return np.concatenate(parts) if parts else np.zeros(0)

    @property
    def has_base(self) -> bool:
        return bool(self.kld)


def mean_and_stderr(x: np.ndarray) -> tuple[float, float]:
    n = len(x)
    if n < 1:
        return 0.0, 0.0
    mean = float(x.sum() / n)
    var = float((x * x).sum() / n) - mean * mean
    return mean, math.sqrt(var / (n - 1)) if var > 0 and n > 10 else 0.0


def covariance_of_means(a: np.ndarray, b: np.ndarray) -> float:
    n = len(a)
    if n < 10:
        return 0.0
    return (float((a * b).sum()) / n - float(a.sum()) / n * float(b.sum()) / n) / (n - 1)


def percentile(sorted_values: np.ndarray, fraction: float) -> float:
    """llama-perplexity's linear interpolation between neighbouring sorted values."""
    if fraction <= 0:
        return float(sorted_values[0])
    if fraction >= 1:
        return float(sorted_values[-1])
    p = fraction * (len(sorted_values) - 1)
    i = int(p)
    p -= i
    return float((1 - p) * sorted_values[i] + p * sorted_values[min(i + 1, len(sorted_values) - 1)])


def ppl_summary(nll: np.ndarray) -> dict:
    ln, ln_se = mean_and_stderr(nll)
    return {"ppl": math.exp(ln), "ppl_stderr": math.exp(ln) * ln_se, "ln_ppl": ln, "ln_ppl_stderr": ln_se}


def kld_summary(scores: TokenScores) -> dict:
    """KLD and delta-ppl statistics as llama-perplexity's --kl-divergence prints them."""
    nll, nll_base = scores.array("nll"), scores.array("nll_base")
    kld = np.sort(scores.array("kld"))
    same = scores.array("same_top").astype(np.float64)
    ln, ln_se = mean_and_stderr(nll)
    ln_b, ln_b_se = mean_and_stderr(nll_base)
    cov = covariance_of_means(nll, nll_base)
    ln_ratio_se = math.sqrt(max(ln_se * ln_se + ln_b_se * ln_b_se - 2 * cov, 0.0))
    ppl, ppl_b = math.exp(ln), math.exp(ln_b)
    ppl_diff_var = (ppl * ln_se) ** 2 + (ppl_b * ln_b_se) ** 2 - 2 * ppl * ppl_b * cov
    kld_mean, kld_se = mean_and_stderr(kld)
    top = float(same.mean()) if len(same) else 0.0
    n = len(kld)
    return {
        "kld_mean": kld_mean, "kld_stderr": kld_se,
        "kld_median": percentile(kld, 0.5), "kld_p99": percentile(kld, 0.99), "kld_max": float(kld[-1]),
        "top1": top, "top1_stderr": math.sqrt(top * (1 - top) / (n - 1)) if n > 1 else 0.0,
        "base_ppl": ppl_b, "base_ppl_stderr": ppl_b * ln_b_se,
        "ln_ppl_ratio": ln - ln_b, "ln_ppl_ratio_stderr": ln_ratio_se,
        "ppl_ratio": math.exp(ln - ln_b), "ppl_ratio_stderr": math.exp(ln - ln_b) * ln_ratio_se,
        "ppl_diff": ppl - ppl_b, "ppl_diff_stderr": math.sqrt(max(ppl_diff_var, 0.0)),
    }

"""Nemotron-H blocks in torch, on GGUF-named weights (the converter's stream), for calibration.

Semantics follow transformers' models/nemotron_h (and llama.cpp's nemotron_h_moe graph):
each layer is x + mixer(rmsnorm(x)); Mamba-2 mixers with a chunked (SSD) scan and a gated,
grouped RMSNorm; causal GQA attention without positional encoding; MoE with a sigmoid router,
bias-corrected (optionally group-limited) top-k, squared-ReLU experts and a shared expert.
Activations are float32; weights are widened to float32 one matmul (one expert) at a time.

`Record(name, x, expert)` receives the input of every matrix that will be quantized.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from nemoq.calib.weights import Weights
from nemoq.convert.config import ModelConfig

Record = Callable[[str, torch.Tensor, Optional[int]], None]

# dt is NOT clamped: llama.cpp's ssm_scan and the mamba_ssm kernels the model was trained with
# use dt_limit = (0, inf). transformers' torch path alone clamps at time_step_min; the imatrix
# should describe the activations llama.cpp will see.
DT_LIMIT = (0.0, math.inf)
SSD_CHUNK = 128   # chunk length of the SSD scan (any length gives the same result)


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x W^T; a weight with its own `linear` (a file's rounded weight, ablations.py) applies itself."""
    if hasattr(w, "linear"):
        return w.linear(x)
    return x @ w.to(torch.float32).T


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w.to(torch.float32)


def relu2(x: torch.Tensor) -> torch.Tensor:
    return torch.relu(x).square()


# ---------------------------------------------------------------------------------- Mamba-2

def segment_sum(a: torch.Tensor) -> torch.Tensor:
    """s[..., i, j] = a[..., j+1] + ... + a[..., i] for i >= j, -inf above the diagonal."""
    n = a.shape[-1]
    a = a[..., None].expand(*a.shape, n)
    below = torch.tril(torch.ones(n, n, dtype=torch.bool, device=a.device), diagonal=-1)
    s = torch.cumsum(a.masked_fill(~below, 0), dim=-2)
    return s.masked_fill(~torch.tril(torch.ones_like(below), diagonal=0), -torch.inf)


def ssd_scan(x, dt, A, B, C, chunk: int = SSD_CHUNK):
    """y[t] = C[t] . h[t],  h[t] = exp(dt[t] A) h[t-1] + dt[t] B[t] x[t], computed chunk-wise.

    x (b, l, h, p), dt (b, l, h), A (h,), B and C (b, l, g, n); heads h = g * r share their
    group's B and C. Returns (b, l, h, p).
    """
    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    r = h // g
    pad = (-l) % chunk
    c = (l + pad) // chunk

    def chunks(t):
        return F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)).reshape(b, c, chunk, *t.shape[2:])
    xs = chunks(x * dt[..., None]).reshape(b, c, chunk, g, r, p)
    a = chunks(dt * A).permute(0, 3, 1, 2)                       # (b, h, c, q)
    B, C = chunks(B), chunks(C)                                  # (b, c, q, g, n)
    a_cum = torch.cumsum(a, dim=-1)

    # within a chunk: attention-like weights C.B, decayed
    decay = torch.exp(segment_sum(a)).reshape(b, g, r, c, chunk, chunk)     # (b, g, r, c, l, s)
    scores = torch.einsum("bclgn,bcsgn->bgcls", C, B)
    y = torch.einsum("bgcls,bgrcls,bcsgrp->bclgrp", scores, decay, xs)

    # state at the end of each chunk, then carried across chunks
    to_end = torch.exp(a_cum[..., -1:] - a_cum).reshape(b, g, r, c, chunk)
    states = torch.einsum("bclgn,bgrcl,bclgrp->bcgrpn", B, to_end, xs)
    states = torch.cat([torch.zeros_like(states[:, :1]), states], dim=1)
    across = torch.exp(segment_sum(F.pad(a_cum[..., -1], (1, 0)))).reshape(b, g, r, c + 1, c + 1)
    states = torch.einsum("bgrzc,bcgrpn->bzgrpn", across, states)[:, :-1]  # state entering chunk z

    from_start = torch.exp(a_cum).reshape(b, g, r, c, chunk)
    y = y + torch.einsum("bclgn,bcgrpn,bgrcl->bclgrp", C, states, from_start)
    return y.reshape(b, c * chunk, h, p)[:, :l]


def mamba2(x: torch.Tensor, w: Weights, cfg: ModelConfig, record: Record) -> torch.Tensor:
    b, l, _ = x.shape
    h, p, g, n = cfg.mamba_heads, cfg.mamba_head_dim, cfg.ssm_groups, cfg.ssm_state
    record(w.name("ssm_in.weight"), x, None)
    z, xBC, dt = linear(x, w["ssm_in.weight"]).split([cfg.d_inner, cfg.conv_dim, h], dim=-1)

    kernel = w["ssm_conv1d.weight"].to(torch.float32)                    # (channels, K)
    bias = w.get("ssm_conv1d.bias")
    xBC = F.conv1d(xBC.transpose(1, 2), kernel[:, None, :], None if bias is None else bias.float(),
                   padding=kernel.shape[-1] - 1, groups=kernel.shape[0])[..., :l]
    xs, B, C = F.silu(xBC).transpose(1, 2).split([cfg.d_inner, g * n, g * n], dim=-1)

    dt = F.softplus(dt + w["ssm_dt.bias"].float()).clamp(*DT_LIMIT)
    xs = xs.reshape(b, l, h, p)
    y = ssd_scan(xs, dt, w["ssm_a"].float().reshape(h), B.reshape(b, l, g, n), C.reshape(b, l, g, n))
    y = y + w["ssm_d"].float().reshape(h, 1) * xs

    # gated RMSNorm, one normalisation per group (ssm_norm is (groups, d_inner / groups))
    y = (y.reshape(b, l, cfg.d_inner) * F.silu(z)).reshape(b, l, g, -1)
    y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + cfg.norm_eps) * w["ssm_norm.weight"].float()
    y = y.reshape(b, l, cfg.d_inner)
    record(w.name("ssm_out.weight"), y, None)
    return linear(y, w["ssm_out.weight"])


# ---------------------------------------------------------------------------------- attention

def attention(x: torch.Tensor, w: Weights, cfg: ModelConfig, record: Record) -> torch.Tensor:
    """Causal grouped-query attention, no positional encoding, scale 1/sqrt(head_dim)."""
    b, l, _ = x.shape
    d, rep = cfg.head_dim, cfg.n_heads // cfg.n_kv_heads
    for name in ("attn_q.weight", "attn_k.weight", "attn_v.weight"):
        record(w.name(name), x, None)
    q = linear(x, w["attn_q.weight"]).reshape(b, l, -1, d).transpose(1, 2)
    k = linear(x, w["attn_k.weight"]).reshape(b, l, -1, d).transpose(1, 2).repeat_interleave(rep, dim=1)
    v = linear(x, w["attn_v.weight"]).reshape(b, l, -1, d).transpose(1, 2).repeat_interleave(rep, dim=1)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=d ** -0.5)
    out = out.transpose(1, 2).reshape(b, l, -1)
    record(w.name("attn_output.weight"), out, None)
    return linear(out, w["attn_output.weight"])


# ---------------------------------------------------------------------------------- MoE

def route(x: torch.Tensor, w: Weights, cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(top-k expert ids, their weights) per token: sigmoid scores, top-k on score + bias."""
    scores = torch.sigmoid(linear(x, w["ffn_gate_inp.weight"]))
    choice = scores + w["exp_probs_b.bias"].float()
    groups = cfg.n_expert_groups
    if groups > 1:   # keep the topk_group groups whose two best experts score highest
        grouped = choice.reshape(-1, groups, cfg.n_experts // groups)
        best = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(-1)
        keep = torch.zeros_like(best, dtype=torch.bool).scatter_(1, best.topk(cfg.n_expert_groups_used, dim=-1).indices, True)
        choice = grouped.masked_fill(~keep[..., None], -torch.inf).reshape(choice.shape)
    # Puzzle: each layer its own top-k (Weights' prefix is "blk.N.")
    top_k = cfg.experts_used_of(int(w.prefix.split(".")[1])) if cfg.is_puzzle else cfg.n_experts_used
    ids = choice.topk(top_k, dim=-1).indices
    weights = scores.gather(1, ids)
    if cfg.norm_topk:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return ids, weights * cfg.routed_scaling


def moe(x: torch.Tensor, w: Weights, cfg: ModelConfig, record: Record) -> torch.Tensor:
    shape = x.shape
    x = x.reshape(-1, shape[-1])
    return (routed_experts(x, w, cfg, record) + shared_expert(x, w, record)).reshape(shape)


def routed_experts(x: torch.Tensor, w: Weights, cfg: ModelConfig, record: Record) -> torch.Tensor:
    """x (tokens, hidden): each token through its top-k experts, weighted by the router. In a
    LatentMoE layer (Nemotron 3 Super) the router reads x, the experts its latent projection,
    and their weighted sum is projected back to the hidden width."""
    ids, weights = route(x, w, cfg)
    latent = "ffn_latent_down.weight" in w
    if latent:
        record(w.name("ffn_latent_down.weight"), x, None)
        x = linear(x, w["ffn_latent_down.weight"])
    out = torch.zeros_like(x)
    up, down = w["ffn_up_exps.weight"], w["ffn_down_exps.weight"]
    for e in torch.unique(ids).tolist():
        token, slot = torch.where(ids == e)
        out.index_add_(0, token, expert(x[token], up[e], down[e], w, e, record) * weights[token, slot, None])
    if latent:
        record(w.name("ffn_latent_up.weight"), out, None)
        out = linear(out, w["ffn_latent_up.weight"])
    return out


def expert(x: torch.Tensor, up: torch.Tensor, down: torch.Tensor, w: Weights, e: int | None,
           record: Record) -> torch.Tensor:
    """One squared-ReLU expert on the tokens routed to it (routed expert e, or the shared one)."""
    kind = "exps" if e is not None else "shexp"
    record(w.name(f"ffn_up_{kind}.weight"), x, e)
    hidden = relu2(linear(x, up))
    record(w.name(f"ffn_down_{kind}.weight"), hidden, e)
    return linear(hidden, down)


def shared_expert(x: torch.Tensor, w: Weights, record: Record) -> torch.Tensor:
    return expert(x, w["ffn_up_shexp.weight"], w["ffn_down_shexp.weight"], w, None, record)


MIXERS = {"mamba": mamba2, "attention": attention, "moe": moe}


def layer(x: torch.Tensor, kind: str, w: Weights, cfg: ModelConfig, record: Record) -> torch.Tensor:
    """One residual block: x + mixer(rmsnorm(x))."""
    return x + MIXERS[kind](rms_norm(x, w["attn_norm.weight"], cfg.norm_eps), w, cfg, record)

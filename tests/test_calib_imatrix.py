"""Our importance matrix against one collected independently with hooks on transformers' model."""

from __future__ import annotations

import re
from collections import defaultdict

import numpy as np
import pytest
import torch

from nemoq.calib.forward import streamed_forward
from nemoq.calib.hparams import config_of
from nemoq.calib.stats import ActivationStats
from nemoq.convert.pipeline import open_source
from tests.test_calib_forward import CLAMP_DT, CPU, token_sequences

# transformers module (under model.layers.N.) -> GGUF tensor: the oracle's own table
LINEAR_NAMES = {
    "mixer.in_proj": "ssm_in", "mixer.out_proj": "ssm_out",
    "mixer.q_proj": "attn_q", "mixer.k_proj": "attn_k", "mixer.v_proj": "attn_v", "mixer.o_proj": "attn_output",
    "mixer.shared_experts.up_proj": "ffn_up_shexp", "mixer.shared_experts.down_proj": "ffn_down_shexp",
}
LAYER_MODULE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


class HookedStatistics:
    """x^2 per input column and token counts, collected from transformers' own activations."""

    def __init__(self, model, n_experts: int):
        self.sums = defaultdict(lambda: 0.0)
        self.counts = defaultdict(lambda: 0)
        self.n_experts = n_experts
        model.config._experts_implementation = "eager"   # the loop whose act_fn calls we observe
        self.handles = []
        for path, module in model.named_modules():
            m = LAYER_MODULE.match(path)
            if path == "lm_head":
                self._hook_linear(module, "output.weight")
            elif m and m.group(2) in LINEAR_NAMES:
                self._hook_linear(module, f"blk.{m.group(1)}.{LINEAR_NAMES[m.group(2)]}.weight")
            elif m and m.group(2) == "mixer.experts":
                self._hook_experts(module, f"blk.{m.group(1)}")

    def _add(self, name, x, expert=0):
        x = x.detach().reshape(-1, x.shape[-1]).double()
        if not isinstance(self.sums[name], np.ndarray):
            rows = self.n_experts if "_exps" in name else 1
            self.sums[name] = np.zeros((rows, x.shape[-1]))
            self.counts[name] = np.zeros(rows)
        self.sums[name][expert] += x.square().sum(0).numpy()
        self.counts[name][expert] += x.shape[0]

    def _hook_linear(self, module, name):
        self.handles.append(module.register_forward_pre_hook(lambda mod, args: self._add(name, args[0])))

    def _hook_experts(self, module, prefix):
        seen = []   # act_fn outputs, one per expert with tokens, in the eager loop's (ascending) order
        self.handles.append(module.act_fn.register_forward_hook(lambda mod, args, y: seen.append(y)))

        def before(mod, args):
            x, ids = args[0], args[1]
            seen.clear()
            for e in range(self.n_experts):
                token = (ids == e).any(-1)
                if token.any():
                    self._add(f"{prefix}.ffn_up_exps.weight", x[token], e)

        def after(mod, args, output):
            hit = sorted(set(args[1].reshape(-1).tolist()))
            assert len(hit) == len(seen)
            for e, y in zip(hit, seen):
                self._add(f"{prefix}.ffn_down_exps.weight", y, e)
        self.handles += [module.register_forward_pre_hook(before), module.register_forward_hook(after)]


def test_imatrix_equals_transformers_hooks(tiny_model):
    from transformers import NemotronHForCausalLM
    sequences = token_sequences(2048, n=3, length=160)
    model = NemotronHForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32).eval()
    if not CLAMP_DT:
        for layer in model.model.layers:
            if hasattr(layer.mixer, "time_step_limit"):
                layer.mixer.time_step_limit = (0.0, float("inf"))
    source = open_source(tiny_model)
    cfg = config_of(source)
    hooked = HookedStatistics(model, cfg.n_experts)
    with torch.no_grad():
        model(torch.from_numpy(sequences.astype(np.int64)))

    stats = ActivationStats(cfg.n_experts)
    streamed_forward(source.plan, cfg, sequences, stats.record, device=CPU).close()
    assert sorted(stats.sums) == sorted(hooked.sums)
    for name, ref in hooked.sums.items():
        np.testing.assert_array_equal(stats.counts[name], hooked.counts[name], err_msg=name)
        assert np.linalg.norm(stats.sums[name] - ref) / np.linalg.norm(ref) <= 1e-4, name
    routed = hooked.counts["blk.1.ffn_up_exps.weight"]
    assert routed.sum() == sequences.size * cfg.n_experts_used and (routed > 0).all()

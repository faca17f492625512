"""The model's hyper-parameters for the forward pass, from config.json or from GGUF metadata.

A checkpoint is read with the converter's own config loader; a GGUF source carries the same
numbers under `nemotron_h_moe.*` (written by nemoq.convert.metadata), read back and checked by
nemoq.convert.gguf_source, which quantize shares.
"""

from __future__ import annotations

from typing import Callable

from nemoq.convert.config import ModelConfig, load_config
from nemoq.convert.gguf_source import config_from_gguf
from nemoq.convert.plan import tensor_specs
from nemoq.errors import NemoqError


def config_of(source, forward: str = "walk") -> ModelConfig:
    """The ModelConfig of an opened source (nemoq.convert.pipeline.Source), for `forward`: "walk"
    (quantize --calibrate and its kin) or "imatrix" (calibrate's streamed forward)."""
    if source.plan.layout != "GGUF":
        config = load_config(source.path)
        _check_forward_runs(config, source, forward)
        return config
    from nemoq.gguf_file import read_gguf
    config = config_from_gguf(read_gguf(source.path).metadata, source.layer_kinds, source.path)
    _check_forward_runs(config, source, forward)
    present = {t.name for t in source.plan.tensors}
    missing = [spec.name for spec in tensor_specs(config) if spec.name not in present]
    if missing:   # the forward pass needs every one (quantize does not)
        raise NemoqError(f"the GGUF lacks {len(missing)} tensor(s) the forward pass needs: "
                         f"{', '.join(missing[:5])}", source.path)
    return config


# What the forwards do not run yet, and which forward: (description, forwards, present(config, plan)).
# Both run LatentMoE and Puzzle layers; calibrate's forward (blocks.py) leaves the MTP block without
# statistics (quantize reports it uncovered), the walk (quantize --calibrate) runs it (walk_mtp.py).
NOT_RUN_YET: tuple[tuple[str, tuple[str, ...], Callable[[ModelConfig, object], object]], ...] = ()


def _check_forward_runs(config: ModelConfig, source, forward: str) -> None:
    missing = [what for what, forwards, present in NOT_RUN_YET if forward in forwards and present(config, source.plan)]
    if missing:
        raise NemoqError(f"calibration does not run {'; nor '.join(missing)} yet; quantize without --calibrate",
                         source.path)

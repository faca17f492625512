"""From a typing plan to the writer: each tensor's encoding (its block format, importance and
`.scale` companion), and the check that an imatrix belongs to the planned model."""

from __future__ import annotations

from nemoq.quant.recipes import TypedTensor


def encoding_for(type_name: str):
    from nemoq.convert.dtypes import FLOAT_ENCODINGS
    from nemoq.quant.encodings import BLOCK_ENCODINGS
    if type_name in FLOAT_ENCODINGS:
        return FLOAT_ENCODINGS[type_name]
    if type_name not in BLOCK_ENCODINGS:
        raise NotImplementedError(f"writing {type_name} tensors is not implemented yet")
    return BLOCK_ENCODINGS[type_name]


def chooser(typed: list[TypedTensor], imatrix=None):
    """The converter's per-tensor encoding choice, from a typing plan (and importance)."""
    by_name = {t.spec.name: t for t in typed}

    def choose(planned):
        from nemoq.convert.modelopt_gguf import keep_stored_nvfp4
        from nemoq.quant.encodings import BLOCK_ENCODINGS
        from nemoq.quant.tensor_scale import ScaledEncoding, takes_scale
        typed_tensor = by_name[planned.name]
        encoding = encoding_for(typed_tensor.type)
        importance = imatrix.importance(planned.name) if imatrix is not None else None
        if typed_tensor.scaled and takes_scale(typed_tensor.spec, typed_tensor.type):
            encoding = ScaledEncoding(encoding, planned.shape, importance)
        elif importance is not None and typed_tensor.type in BLOCK_ENCODINGS:   # float types ignore it
            encoding = encoding.with_importance(importance, rows_per_matrix=planned.shape[-2])
        # NVFP4 wanted from a ModelOpt NVFP4 tensor: NVIDIA's blocks are kept, not re-quantized
        return keep_stored_nvfp4(planned, encoding, scale_tensors=typed_tensor.scaled)
    return choose


def check_imatrix(typed: list[TypedTensor], imatrix, path) -> list[str]:
    """Errors when the imatrix belongs to another model; the quantized tensors it does not cover."""
    from nemoq.errors import NemoqError
    specs = {t.spec.name: t.spec for t in typed}
    for name, sums in imatrix.sums.items():
        spec = specs.get(name)
        if spec is None:
            raise NemoqError(f"imatrix does not match the model: it has {name}, the model does not", path)
        n_mat = spec.n_matrices
        if sums.shape[-1] != spec.row_width or sums.shape[0] not in (1, n_mat):
            raise NemoqError(f"imatrix does not match the model: {name} has {sums.shape[0]} x {sums.shape[-1]} "
                             f"statistics, the model's tensor needs {n_mat} x {spec.row_width}", path)
    return [t.spec.name for t in typed if t.type not in ("f32", "f16", "bf16") and t.spec.name not in imatrix.sums]

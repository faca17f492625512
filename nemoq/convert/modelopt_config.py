"""Which ModelOpt quantization a checkpoint folder declares: algorithm, group size, exclusions.

NVIDIA ModelOpt writes `hf_quant_config.json` (`{"producer": ..., "quantization": {"quant_algo":
"NVFP4", "group_size": 16, "exclude_modules": [...]}}`) and, in newer exports, the same facts as
`quantization_config` in config.json (`quant_method: "modelopt"`, exclusions under
`exclude_modules` or `ignore`). Exclusions are module names or glob patterns
(`"*mixer.conv1d*"`, `"lm_head"`); excluded modules are stored unquantized.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from pathlib import Path

from nemoq.errors import NemoqError
from nemoq.inputs import read_json_object

HF_QUANT_CONFIG = "hf_quant_config.json"
CONFIG = "config.json"

# quant_algo -> the per-tensor storage nemoq reads (MIXED_PRECISION names one per module)
ALGORITHMS = {"NVFP4": "NVFP4", "FP8": "FP8"}
MIXED = "MIXED_PRECISION"
NVFP4_GROUP = 16   # GGUF's NVFP4 block holds 16-value groups, each with one UE4M3 scale
EXCLUDE_KEYS = ("exclude_modules", "ignore")


@dataclass(frozen=True)
class QuantConfig:
    algo: str                       # NVFP4, FP8 or MIXED_PRECISION
    group_size: int | None
    exclude: tuple[str, ...]
    per_module: dict                # MIXED_PRECISION: module name -> algorithm
    path: Path                      # the file that declared it, for error messages

    def is_excluded(self, module: str) -> bool:
        return any(fnmatch.fnmatchcase(module, p) for p in self.exclude)

    def algo_for(self, module: str) -> str | None:
        return self.per_module.get(module) if self.algo == MIXED else self.algo

    def describe(self) -> str:
        group = f", group {self.group_size}" if self.group_size else ""
        return f"ModelOpt {self.algo}{group}, {len(self.exclude)} excluded module pattern(s)"


def _declared(model_dir: Path) -> tuple[dict, Path] | None:
    """The quantization section and its file: hf_quant_config.json first, then config.json."""
    hf = model_dir / HF_QUANT_CONFIG
    if hf.is_file():
        section = read_json_object(hf).get("quantization")
        if not isinstance(section, dict):
            raise NemoqError("no \"quantization\" section", hf)
        return section, hf
    config = model_dir / CONFIG
    if config.is_file():
        section = read_json_object(config).get("quantization_config")
        if isinstance(section, dict) and str(section.get("quant_method", "")).lower() == "modelopt":
            return section, config
        if isinstance(section, dict) and section.get("quant_algo") is not None:
            return section, config
    return None


def read_quant_config(model_dir: Path) -> QuantConfig | None:
    """The checkpoint's ModelOpt quantization, or None for an unquantized checkpoint."""
    declared = _declared(Path(model_dir))
    if declared is None:
        return None
    section, path = declared
    algo = str(section.get("quant_algo"))
    per_module: dict = {}
    if algo == MIXED:
        layers = section.get("quantized_layers") or {}
        if not isinstance(layers, dict):
            raise NemoqError("quantized_layers must map module names to {\"quant_algo\": ...}", path)
        per_module = {m: str(v.get("quant_algo")) for m, v in layers.items() if isinstance(v, dict)}
        unknown = sorted({a for a in per_module.values() if a not in ALGORITHMS})
        if unknown:
            raise NemoqError(f"quantized_layers use quant_algo {', '.join(unknown)}; nemoq reads "
                             f"{', '.join(ALGORITHMS)}", path)
        odd = [v.get("group_size") for v in layers.values() if isinstance(v, dict) and v.get("quant_algo") == "NVFP4"
               and v.get("group_size") not in (None, NVFP4_GROUP)]
        if odd:
            raise NemoqError(f"NVFP4 group_size {odd[0]} in quantized_layers: "
                             f"GGUF's NVFP4 needs groups of {NVFP4_GROUP}", path)
    elif algo not in ALGORITHMS:
        raise NemoqError(f"unsupported quant_algo {algo!r}; nemoq reads {', '.join([*ALGORITHMS, MIXED])}", path)
    group_size = section.get("group_size")
    uses_nvfp4 = algo == "NVFP4" or "NVFP4" in per_module.values()
    if uses_nvfp4 and group_size not in (None, NVFP4_GROUP):
        raise NemoqError(f"NVFP4 group_size {group_size}: GGUF's NVFP4 needs groups of {NVFP4_GROUP}", path)
    exclude = next((section[k] for k in EXCLUDE_KEYS if isinstance(section.get(k), list)), [])
    return QuantConfig(algo, group_size, tuple(map(str, exclude)), per_module, path)

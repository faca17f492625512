"""Which GGUF type each tensor gets. For now: the Q8_0 recipe behind `convert --outtype q8_0`."""

from __future__ import annotations

from dataclasses import dataclass, field

import gguf

from nemoq.convert.dtypes import FLOAT_ENCODINGS, Encoding
from nemoq.convert.plan import PlannedTensor
from nemoq.quant.encodings import BLOCK_ENCODINGS


@dataclass(frozen=True)
class Recipe:
    name: str
    matrix_type: str         # type for 2-D/3-D weights
    fallback_type: str       # when a row width does not fit the block size
    file_type: gguf.LlamaFileType


RECIPES = {
    "Q8_0": Recipe("Q8_0", "q8_0", "f16", gguf.LlamaFileType.MOSTLY_Q8_0),
}


def encoding(type_name: str) -> Encoding:
    return BLOCK_ENCODINGS.get(type_name) or FLOAT_ENCODINGS[type_name]


@dataclass
class RecipeChooser:
    """Picks an encoding per tensor and remembers every fallback, so none is silent."""
    recipe: Recipe
    fallbacks: list[tuple[str, str]] = field(default_factory=list)   # (tensor, why)

    def __call__(self, t: PlannedTensor) -> Encoding:
        if t.keep_f32 or len(t.shape) < 2:
            return FLOAT_ENCODINGS["f32"]
        wanted = encoding(self.recipe.matrix_type)
        block = gguf.GGML_QUANT_SIZES[wanted.ggml_type][0]
        if t.row_width % block:
            self.fallbacks.append((t.name, f"row width {t.row_width} is not a multiple of {block}"))
            return encoding(self.recipe.fallback_type)
        return wanted

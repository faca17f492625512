"""Which GGUF type each tensor gets: recipes as tables of rules, and the typing plan.

A recipe is a base type plus rules `(tensor-name regex, type, layer predicate, why)`; the
first matching rule wins. Norms, SSM parameters and the router stay F32 whatever the recipe.
When a type's block does not divide a tensor's rows, the fallback table picks the nearest
format that fits and the plan says so: Nemotron 3 Nano's 2688 / 1856 / 3712 widths are
multiples of 64 but not of 256, the k-quant block.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterable

import gguf

from nemoq.convert.dtypes import block_size, type_nbytes
from nemoq.convert.plan import TensorSpec

FT = gguf.LlamaFileType

# general.file_type names the llama.cpp recipe that made a file (llama.cpp's own mixes, Q4_K_M
# or MXFP4_MOE, are labelled that way). A file no llama.cpp recipe makes (nemoq's own recipes, or
# any recipe whose types --tensor-type changed) gets what llama.cpp's loader writes down for a file
# without the key: the file type of its dominant tensor type with the GUESSED bit set
# (llama_model_loader), which llama.cpp shows as e.g. "IQ4_NL - 4.5 bpw (guessed)".
GUESSED = FT.GUESSED
# llama_model_loader's table, tensor type -> the file type it guesses from it
GUESSED_FILE_TYPES = {
    "f32": FT.ALL_F32, "f16": FT.MOSTLY_F16, "bf16": FT.MOSTLY_BF16, "q8_0": FT.MOSTLY_Q8_0,
    "q6_k": FT.MOSTLY_Q6_K, "q5_k": FT.MOSTLY_Q5_K_M, "q5_1": FT.MOSTLY_Q5_1, "q5_0": FT.MOSTLY_Q5_0,
    "q4_k": FT.MOSTLY_Q4_K_M, "q4_0": FT.MOSTLY_Q4_0, "iq4_nl": FT.MOSTLY_IQ4_NL,
    "mxfp4": FT.MOSTLY_MXFP4_MOE, "nvfp4": FT.MOSTLY_NVFP4,
}


# When a type's block does not divide the row width: the next format to try. For the types of
# llama.cpp's recipes this is llama.cpp's own table (tensor_type_fallback), so a recipe with
# its name makes the same file and the two compare tensor for tensor; the plan says how many
# weights fell back and what that costs in bits.
FALLBACKS = {
    "q4_k": "q5_0",     # 4.5 -> 5.5 bpw (for a 4-bit file at these widths: IQ4_NL, NQ4)
    "q5_k": "q5_1",     # 5.5 -> 6 bpw
    "q5_1": "q8_0",
    "q6_k": "q8_0",     # no 32-block 6-bit format; 8.5 bpw
    "iq4_nl": "q8_0",
    "q5_0": "q8_0",
    "q4_0": "q8_0",
    "mxfp4": "q8_0",
    "nvfp4": "q8_0",
    "q8_0": "f16",
}


def use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's use_more_bits: the first and last eighth, and every third one between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


@dataclass(frozen=True)
class LayerFacts:
    """What rule predicates may ask about the model."""
    layer_kinds: tuple[str, ...]
    n_experts: int = 0

    @classmethod
    def from_specs(cls, specs: list[TensorSpec], layer_kinds: tuple[str, ...]) -> "LayerFacts":
        shapes = {s.name.split(".", 2)[-1]: s.shape for s in specs if s.layer is not None}
        return cls(layer_kinds, shapes.get("ffn_up_exps.weight", (0,))[0])

    def mtp(self, layer: int | None) -> bool:
        """The multi-token-prediction block llama.cpp appends after the trunk's layers."""
        return layer is not None and layer >= len(self.layer_kinds)

    def more_bits(self, layer: int | None) -> bool:
        """use_more_bits over all layers (llama.cpp's ffn_down rule: the block index)."""
        return layer is not None and use_more_bits(layer, len(self.layer_kinds))

    def _attention_ordinal(self, layer: int | None) -> int | None:
        if layer is None or self.mtp(layer) or self.layer_kinds[layer] != "attention":
            return None
        return self.layer_kinds[:layer].count("attention")

    def more_bits_attention(self, layer: int | None) -> bool:
        """use_more_bits over the attention layers (llama.cpp's attn_v rule counts attn_v tensors)."""
        i = self._attention_ordinal(layer)
        return i is not None and use_more_bits(i, self.layer_kinds.count("attention"))

    def first_four_attention(self, layer: int | None) -> bool:
        i = self._attention_ordinal(layer)
        return i is not None and i < 4

    def next_to_attention(self, layer: int | None) -> bool:
        """A Mamba layer whose nearest mixer neighbour (skipping MoE layers) is attention."""
        if layer is None or self.mtp(layer) or self.layer_kinds[layer] != "mamba":
            return False
        for step in (-1, 1):
            i = layer + step
            while 0 <= i < len(self.layer_kinds) and self.layer_kinds[i] == "moe":
                i += step
            if 0 <= i < len(self.layer_kinds) and self.layer_kinds[i] == "attention":
                return True
        return False

    def first_eighth(self, layer: int | None) -> bool:
        return layer is not None and layer < len(self.layer_kinds) // 8


PREDICATES: dict[str, Callable[[LayerFacts, int | None], bool]] = {
    "always": lambda facts, layer: True,
    "mtp": LayerFacts.mtp,
    "more_bits": LayerFacts.more_bits,
    "more_bits_attention": LayerFacts.more_bits_attention,
    "first_four_attention": LayerFacts.first_four_attention,
    "next_to_attention": LayerFacts.next_to_attention,
    "first_eighth": LayerFacts.first_eighth,
    # llama.cpp's rules for 8-expert models (written for Mixtral; they apply to any n_expert == 8,
    # the tiny test model included, not to Nemotron 3 Nano's 128)
    "eight_experts": lambda facts, layer: facts.n_experts == 8,
}


@dataclass(frozen=True)
class Rule:
    pattern: str
    type: str
    when: str = "always"
    why: str = ""


@dataclass(frozen=True)
class Recipe:
    name: str
    base: str
    file_type: int        # general.file_type: llama.cpp's for its recipes, with GUESSED for nemoq's
    rules: tuple[Rule, ...] = ()
    description: str = ""


EXPERTS = r"ffn_(up|down)_exps"
MAMBA = r"ssm_(in|out)"
ATTENTION = r"attn_(q|k|v|output)\.weight"
LATENT = r"ffn_latent_(down|up)"

# The MTP block (Super, Lightning) is small next to the trunk and decides how many drafted tokens
# are accepted: every recipe below 8 bits keeps it in Q8_0 (first rule, so nothing else applies).
KEEP_MTP = Rule(r".", "q8_0", "mtp", "MTP block: small, drives speculative acceptance (>= 8 bits)")

# llama.cpp's rules shared by its recipes (llama_tensor_get_type): the output projection in
# Q6_K, and for 8-expert models attention K/V in Q8_0 and (4-bit mixes) attention output in Q5_K.
OUTPUT_Q6_K = Rule(r"^output\.weight", "q6_k", why="output projection")
EIGHT_EXPERT_KV = (Rule(r"attn_[kv]\.weight", "q8_0", "eight_experts", "llama.cpp: attention K/V of 8-expert models"),)
EIGHT_EXPERT_OUT = Rule(r"attn_output\.weight", "q5_k", "eight_experts", "llama.cpp: attention output of 8-expert models")

RECIPES: dict[str, Recipe] = {r.name: r for r in (
    Recipe("F32", "f32", FT.ALL_F32, description="no quantization"),
    Recipe("F16", "f16", FT.MOSTLY_F16, description="16-bit floats"),
    Recipe("BF16", "bf16", FT.MOSTLY_BF16, description="bfloat16, a byte copy of a BF16 checkpoint"),
    Recipe("Q8_0", "q8_0", FT.MOSTLY_Q8_0, description="8-bit, near-lossless"),
    Recipe("Q6_K", "q6_k", FT.MOSTLY_Q6_K, (KEEP_MTP, *EIGHT_EXPERT_KV),
           "6-bit k-quant (rows not a multiple of 256 fall back)"),
    Recipe("Q5_K_M", "q5_k", FT.MOSTLY_Q5_K_M, (
        KEEP_MTP,
        OUTPUT_Q6_K, *EIGHT_EXPERT_KV,
        Rule(r"attn_v\.weight", "q6_k", "more_bits_attention", "llama.cpp's use_more_bits attention layers"),
        Rule(r"ffn_down", "q6_k", "more_bits", "llama.cpp's use_more_bits layers"),
    ), "5-bit k-quant mix"),
    Recipe("Q4_K_M", "q4_k", FT.MOSTLY_Q4_K_M, (
        KEEP_MTP,
        OUTPUT_Q6_K, *EIGHT_EXPERT_KV, EIGHT_EXPERT_OUT,
        Rule(r"attn_v\.weight", "q6_k", "more_bits_attention", "llama.cpp's use_more_bits attention layers"),
        Rule(r"ffn_down", "q6_k", "more_bits", "llama.cpp's use_more_bits layers"),
    ), "4-bit k-quant mix"),
    Recipe("Q4_K_S", "q4_k", FT.MOSTLY_Q4_K_S, (
        KEEP_MTP,
        OUTPUT_Q6_K, *EIGHT_EXPERT_KV, EIGHT_EXPERT_OUT,
        Rule(r"attn_v\.weight", "q5_k", "first_four_attention", "the first four attention layers"),
        Rule(r"ffn_down", "q5_k", "first_eighth", "first eighth of the layers"),
    ), "4-bit k-quant, smaller"),
    Recipe("IQ4_NL", "iq4_nl", FT.MOSTLY_IQ4_NL, (
        KEEP_MTP,
        OUTPUT_Q6_K, *EIGHT_EXPERT_KV, EIGHT_EXPERT_OUT,
        # (llama.cpp's attn_v rule for 4+ query heads per KV head reads layer 0's head counts:
        # a Mamba layer in this architecture, so it never applies)
    ), "4.5-bit non-linear, 32-value blocks (fits every width)"),
    Recipe("MXFP4_MOE", "q8_0", FT.MOSTLY_MXFP4_MOE, (
        KEEP_MTP,
        Rule(EXPERTS, "mxfp4", why="routed experts in MXFP4, the rest Q8_0 (as llama.cpp)"),
    ), "MXFP4 routed experts, Q8_0 elsewhere"),
    Recipe("NVFP4", "nvfp4", FT.MOSTLY_NVFP4 | GUESSED, (
        KEEP_MTP,
        Rule(r"token_embd|^output\.weight", "q8_0", why="embeddings and output stay >= 8 bits (as NVIDIA's release)"),
        Rule(LATENT, "q8_0", why="latent projections: FP8 or BF16 in NVIDIA's release"),
        Rule(ATTENTION, "q8_0", why="attention stays >= 8 bits (as NVIDIA's release)"),
        Rule(MAMBA, "q8_0", "next_to_attention", "Mamba layers next to attention stay >= 8 bits"),
    ), "NVFP4 experts and Mamba projections, following NVIDIA's NVFP4 release"),
    # nemoq's own: formats with 32-value blocks fit 2688 / 1856 / 3712, and bits go where
    # hybrid models are sensitive (ssm_out, attention, Mamba next to attention, expert down).
    Recipe("NQ4", "iq4_nl", FT.MOSTLY_IQ4_NL | GUESSED, (
        KEEP_MTP,
        Rule(r"token_embd", "q5_0", why="embeddings: 5 bits"),
        Rule(LATENT, "q8_0", why="latent projections see every token's MoE input and output"),
        Rule(r"^output\.weight", "q8_0", why="output projection"),
        Rule(ATTENTION, "q8_0", why="attention is sensitive and small"),
        Rule(MAMBA, "q8_0", "next_to_attention", "Mamba layers next to attention"),
        Rule(r"ssm_out", "q6_k", why="ssm_out is the most sensitive Mamba tensor"),
        Rule(r"ssm_in", "q5_0", why="Mamba input projection"),
        Rule(r"ffn_down_shexp", "q8_0", why="the shared expert sees every token"),
        Rule(r"ffn_up_shexp", "q5_0", why="the shared expert sees every token"),
    ), "nemoq 4-bit: IQ4_NL experts, more bits where the hybrid is sensitive (~4.7 bpw)"),
    Recipe("NQ5", "q5_0", FT.MOSTLY_Q5_0 | GUESSED, (
        KEEP_MTP,
        Rule(r"^output\.weight|token_embd", "q8_0", why="embeddings and output"),
        Rule(LATENT, "q8_0", why="latent projections see every token's MoE input and output"),
        Rule(ATTENTION, "q8_0", why="attention is sensitive and small"),
        Rule(MAMBA, "q8_0", "next_to_attention", "Mamba layers next to attention"),
        Rule(r"ssm_out|ffn_down_shexp", "q8_0", why="most sensitive projections"),
    ), "nemoq 5-bit: Q5_0 experts, Q8_0 where the hybrid is sensitive (~5.7 bpw)"),
)}


@dataclass(frozen=True)
class TypedTensor:
    spec: TensorSpec
    type: str
    wanted: str           # the type the rules asked for (differs after a fallback)
    reason: str
    fallback_why: str = ""
    scaled: bool = True   # FP4 types get a per-matrix `<name>.scale` tensor (tensor_scale.py)

    @property
    def nbytes(self) -> int:
        from nemoq.quant.tensor_scale import takes_scale
        scales = 4 * self.spec.n_matrices if self.scaled and takes_scale(self.spec, self.type) else 0  # `.scale`
        return type_nbytes(self.type, self.spec.n_elements) + scales

    @property
    def fell_back(self) -> bool:
        return self.type != self.wanted


def stays_f32(spec: TensorSpec) -> bool:
    """Norms, SSM parameters, the router and every 1-D tensor: F32 whatever the recipe."""
    return spec.keep_f32 or len(spec.shape) < 2


def parse_override(text: str) -> tuple[str, str]:
    """'REGEX=TYPE' from --tensor-type."""
    pattern, sep, type_name = text.rpartition("=")
    if not sep or not pattern or type_name.lower() not in FALLBACKS and type_name.lower() not in ("f32", "f16", "bf16"):
        raise ValueError(f"--tensor-type {text!r}: expected REGEX=TYPE with TYPE one of "
                         f"{', '.join(sorted({*FALLBACKS, 'f32', 'f16', 'bf16'}))}")
    re.compile(pattern)
    return pattern, type_name.lower()


def _fit(type_name: str, row_width: int) -> tuple[str, str]:
    """The requested type, or its fallback chain until one divides the row width."""
    why = ""
    while row_width % block_size(type_name):
        nxt = FALLBACKS[type_name]
        why = why or f"row width {row_width} is not a multiple of {block_size(type_name)} ({type_name})"
        type_name = nxt
    return type_name, why


def plan_types(specs: Iterable[TensorSpec], recipe: Recipe, layer_kinds: tuple[str, ...],
               overrides: Iterable[tuple[str, str]] = (), tensor_scales: bool = True) -> list[TypedTensor]:
    specs = list(specs)
    facts = LayerFacts.from_specs(specs, layer_kinds)
    overrides = list(overrides)
    # Tied embeddings: without output.weight, llama.cpp runs the output projection on token_embd
    # and its recipes type token_embd as the output (llama_tensor_get_type's !has_output)
    tied = not any(spec.name == "output.weight" for spec in specs)
    typed = []
    for spec in specs:
        rule_name = "output.weight" if tied and spec.name == "token_embd.weight" else spec.name
        if stays_f32(spec):
            typed.append(TypedTensor(spec, "f32", "f32", "kept F32 (norm, SSM parameter or router)"))
            continue
        wanted, reason = recipe.base, f"{recipe.name} base type"
        for pattern, type_name in overrides:
            if re.search(pattern, spec.name):
                wanted, reason = type_name, f"--tensor-type {pattern}={type_name}"
                break
        else:
            for rule in recipe.rules:
                if re.search(rule.pattern, rule_name) and PREDICATES[rule.when](facts, spec.layer):
                    wanted, reason = rule.type, rule.why or rule.pattern
                    break
        final, why = _fit(wanted, spec.row_width)
        typed.append(TypedTensor(spec, final, wanted, reason, why, scaled=tensor_scales))
    return typed


def file_type_of(recipe: Recipe, typed: list[TypedTensor], layer_kinds: tuple[str, ...]) -> int:
    """general.file_type of the file a plan makes: the recipe's own when the plan types every
    tensor as the recipe does, else the guessed file type of the type holding the most weights."""
    own = plan_types([t.spec for t in typed], recipe, layer_kinds)
    if [t.type for t in own] == [t.type for t in typed]:
        return int(recipe.file_type)
    weights: dict[str, int] = {}
    for t in typed:
        weights[t.type] = weights.get(t.type, 0) + t.spec.n_elements
    return int(GUESSED_FILE_TYPES[max(weights, key=weights.get)] | GUESSED)


def recipe_label(recipe: Recipe, overrides: Iterable[tuple[str, str]] = ()) -> str:
    """What metadata.RECIPE_KEY records: 'NQ4', or 'NQ4 --tensor-type ffn_up_exps=q8_0'."""
    return " ".join([recipe.name, *(f"--tensor-type {pattern}={type_name}" for pattern, type_name in overrides)])


KEPT_F32_WHY = ("norms, SSM parameters and the router stay F32 in every recipe (tiny and precision-critical; "
                "llama.cpp's own quantizer never quantizes them either)")


def override_warnings(specs: Iterable[TensorSpec], overrides: Iterable[tuple[str, str]]) -> list[str]:
    """The --tensor-type overrides that change nothing, or less than they say, one sentence each:
    a pattern that matches no tensor, matches tensors kept F32 (named, and why), or matches only
    tensors an earlier override already sets (plan_types applies the first matching one)."""
    specs = list(specs)
    warnings, taken = [], set()
    for pattern, type_name in overrides:
        flag = f"--tensor-type {pattern}={type_name}"
        matched = [s for s in specs if re.search(pattern, s.name)]
        kept = [s.name for s in matched if stays_f32(s)]
        others = [s.name for s in matched if not stays_f32(s)]
        if not matched:
            warnings.append(f"{flag} matches no tensor of this model: it changes nothing")
        if kept and type_name != "f32":
            warnings.append(f"{flag} matches {len(kept)} tensor(s) that stay F32 ({_some(kept)}): {KEPT_F32_WHY}")
        if others and taken.issuperset(others):
            warnings.append(f"{flag} changes nothing: every tensor it matches ({_some(others)}) is set by an "
                            f"earlier --tensor-type (the first matching one wins)")
        taken.update(others)
    return warnings


def _some(names: list[str], shown: int = 3) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


@dataclass(frozen=True)
class PlanSummary:
    total_bytes: int
    n_elements: int
    fallback_tensors: int
    fallback_elements: int
    quantizable_elements: int
    wanted_bytes: int      # what the recipe's types would take if every block divided its rows

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.total_bytes / max(self.n_elements, 1)

    @property
    def wanted_bits_per_weight(self) -> float:
        return 8 * self.wanted_bytes / max(self.n_elements, 1)

    @property
    def warn_fallbacks(self) -> bool:
        return self.fallback_share > FALLBACK_WARNING_SHARE

    @property
    def fallback_share(self) -> float:
        return self.fallback_elements / max(self.quantizable_elements, 1)


FALLBACK_WARNING_SHARE = 0.10


def summarize(typed: list[TypedTensor]) -> PlanSummary:
    quantizable = [t for t in typed if t.wanted != "f32"]
    fallbacks = [t for t in typed if t.fell_back]
    return PlanSummary(
        total_bytes=sum(t.nbytes for t in typed),
        n_elements=sum(t.spec.n_elements for t in typed),
        fallback_tensors=len(fallbacks),
        fallback_elements=sum(t.spec.n_elements for t in fallbacks),
        quantizable_elements=sum(t.spec.n_elements for t in quantizable),
        wanted_bytes=sum(t.nbytes - type_nbytes(t.type, t.spec.n_elements) + type_nbytes(t.wanted, t.spec.n_elements)
                         for t in typed),
    )


def recipes_that_fit(specs: list[TensorSpec], layer_kinds: tuple[str, ...]) -> list[tuple[str, float]]:
    """(recipe, bits per weight) of the quantizing recipes whose formats fit this model's widths (no
    fallback warning), smallest first."""
    fits = []
    for recipe in RECIPES.values():
        if recipe.base in ("f32", "f16", "bf16"):
            continue
        summary = summarize(plan_types(specs, recipe, layer_kinds))
        if not summary.warn_fallbacks:
            fits.append((recipe.name, summary.bits_per_weight))
    return sorted(fits, key=lambda fit: fit[1])

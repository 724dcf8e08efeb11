"""What differs between model families, in one table: adapted layers, fused slices and the recipe.

A family is one `Family` entry of `FAMILIES`. ComfyUI names each loaded model by its config class
(`comfy.supported_models`: SD15, SDXL, Flux, FluxSchnell, SD3, Lumina2, ZImage, QwenImage, ...); an
entry lists the config classes it covers, and `family_for` also walks a class's bases, so a subclass
(FluxSchnell of Flux, SSD1B of SDXL) finds its parent's entry. Adding a family is adding an entry.

Layers are picked by `TargetRule`s: a regular expression over module paths below the diffusion
model, and, for fused weights (Flux's `img_attn.qkv` and `linear1`, SD3's `qkv`, Lumina 2's
grouped-query `qkv`), the projections to adapt. Each projection of a fused weight gets its own
adapter on its own rows of the output (never one adapter across q, k and v), under the layer key
`diffusion_model.<module path>.<projection>`; a whole Linear's key is `diffusion_model.<module path>`.

Recipes: the paper's SD-XL recipe (T-LoRA, rank 64, r_min 32, 800 steps) for the UNets; the
reference code's FLUX recipe (Vanilla T-LoRA, rank 32, r_min 1, 1000 steps at 1024 px, guidance 1
while training) for Flux, and by analogy for the other flow transformers, for which the paper
gives no recipe.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterator, Optional

import torch

from .errors import TLoraConfigError

# How a fused output splits into projections: name -> (offset, size) given (out_features, in_features).
# "qkv": q is as wide as the input (the model width); k and v share the rest (grouped-query attention
# gives them fewer heads). "qkv_mlp": Flux single blocks' linear1, q, k, v of the model width, then the MLP.
FUSED_LAYOUTS = ("qkv", "qkv_mlp")
AUTO = "auto"  # "the family's recipe", for the Train node's variant


def fused_rows(layout: str, out_features: int, in_features: int) -> dict[str, tuple[int, int]]:
    """(offset, size) along the output of every projection of a fused weight."""
    q = in_features
    if layout == "qkv":
        kv, rest = divmod(out_features - q, 2)
        if rest or kv <= 0:
            raise TLoraConfigError(f"a fused qkv weight of {out_features} outputs cannot hold q of {q} "
                                   f"and two equal k, v parts; this model's layout is not supported.")
        return {"q": (0, q), "k": (q, kv), "v": (q + kv, kv)}
    if layout == "qkv_mlp":
        if out_features <= 3 * q:
            raise TLoraConfigError(f"a fused qkv+mlp weight of {out_features} outputs is too narrow for "
                                   f"q, k, v of {q} each and an MLP part.")
        return {"q": (0, q), "k": (q, q), "v": (2 * q, q), "mlp": (3 * q, out_features - 3 * q)}
    raise TLoraConfigError(f"unknown fused layout {layout!r}; known: {', '.join(FUSED_LAYOUTS)}.")


@dataclass(frozen=True)
class TargetRule:
    """Linear layers whose path (below the diffusion model) fully matches `pattern`; for a fused
    weight, `layout` names how it splits and `parts` which projections get an adapter."""

    pattern: str
    layout: Optional[str] = None
    parts: tuple[str, ...] = ()


@dataclass(frozen=True)
class Site:
    """Where one adapter sits: a Linear and, for a fused weight, its rows (offset, size)."""

    layer_key: str            # diffusion_model.<path>[.<projection>]
    module_path: str          # path below the BaseModel: diffusion_model.<path>
    rows: Optional[tuple[int, int]] = None
    in_features: int = 0
    out_features: int = 0     # of the adapter (the slice's size for a fused weight)


@dataclass(frozen=True)
class Preview:
    """How the Train node samples its preview images for a family: Euler steps, CFG scale and, for
    guidance-distilled models, the guidance to sample at (not the training guidance)."""

    steps: int = 12
    cfg: float = 5.0
    guidance: Optional[float] = None


@dataclass(frozen=True)
class Recipe:
    """Training defaults of a family (what "auto" / 0 stand for on the Train node)."""

    variant: str
    rank: int
    min_rank: int
    steps: int
    resolution: int                   # native training size in px
    guidance: Optional[float] = None  # guidance while training, for guidance-distilled models
    preview: Preview = Preview()

    def resolve(self, variant: str = AUTO, rank: int = 0, min_rank: int = 0, steps: int = 0) -> dict:
        """Concrete settings where the node says "auto" (variant) or 0 (rank, r_min, steps).

        An r_min left at 0 keeps the recipe's proportion r_min / r for a rank that was set (the paper's
        r/2 for SD, the reference's 1 of 32 for FLUX), at least 1.
        """
        if rank == 0:
            rank = self.rank
            min_rank = min_rank or self.min_rank
        elif min_rank == 0:
            min_rank = max(1, rank * self.min_rank // self.rank)
        return {"variant": self.variant if variant == AUTO else variant, "rank": rank, "min_rank": min_rank,
                "steps": steps or self.steps}


@dataclass(frozen=True)
class Family:
    name: str
    config_classes: tuple[str, ...]
    targets: dict  # target set name -> tuple[TargetRule, ...]; "attention" is the paper's choice
    recipe: Recipe
    note: str = ""
    # The model adds to its residual stream in place (ComfyUI's Flux blocks: `x += ...`) after saving
    # it for backward, which autograd refuses; training then keeps copies of the saved activations.
    inplace_residuals: bool = False

    def rules(self, targets: str) -> tuple[TargetRule, ...]:
        if targets not in self.targets:
            raise TLoraConfigError(f"targets {targets!r} are not defined for {self.name}; choose one of "
                                   f"{', '.join(self.targets)}.")
        return self.targets[targets]

    def all_rules(self) -> tuple[TargetRule, ...]:
        seen: dict = {}
        for rules in self.targets.values():
            for rule in rules:
                seen.setdefault(rule, None)
        return tuple(seen)


def _unet_attention() -> dict:
    attn = r".*\.attn[12]\.(to_q|to_k|to_v|to_out\.0)"
    return {"attention": (TargetRule(attn),),
            "attention+feedforward": (TargetRule(attn), TargetRule(r".*\.ff\.net\.(0\.proj|2)"))}


PAPER = Recipe("tlora", 64, 32, 800, 1024)
# Previews: CFG 1 at ComfyUI's default guidance 3.5 for guidance-distilled Flux, CFG 4 for the other DiTs.
FLUX_REFERENCE = Recipe("vanilla_tlora", 32, 1, 1000, 1024, guidance=1.0, preview=Preview(cfg=1.0, guidance=3.5))
FLOW_DIT = Recipe("vanilla_tlora", 32, 1, 1000, 1024,  # the FLUX recipe, for DiTs without guidance input
                  preview=Preview(cfg=4.0))
QKV = ("q", "k", "v")

_FLUX_ATTENTION = (
    TargetRule(r"double_blocks\.\d+\.img_attn\.qkv", "qkv", QKV),
    TargetRule(r"double_blocks\.\d+\.img_attn\.proj"),
    TargetRule(r"double_blocks\.\d+\.txt_attn\.qkv", "qkv", QKV),
    TargetRule(r"single_blocks\.\d+\.linear1", "qkv_mlp", QKV),
)
_SD3_ATTENTION = (
    TargetRule(r"joint_blocks\.\d+\.x_block\.attn2?\.qkv", "qkv", QKV),
    TargetRule(r"joint_blocks\.\d+\.x_block\.attn2?\.proj"),
    TargetRule(r"joint_blocks\.\d+\.context_block\.attn\.qkv", "qkv", QKV),
)
_LUMINA_ATTENTION = (
    TargetRule(r"(layers|noise_refiner|context_refiner)\.\d+\.attention\.qkv", "qkv", QKV),
    TargetRule(r"(layers|noise_refiner|context_refiner)\.\d+\.attention\.out"),
)
_QWEN_ATTENTION = (TargetRule(r"transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|"
                              r"add_v_proj)"),)

FAMILIES: tuple[Family, ...] = (
    Family("SD1.x", ("SD15", "SD15_instructpix2pix"), _unet_attention(), Recipe("tlora", 64, 32, 800, 512),
           "the paper's recipe at SD 1.5's size"),
    Family("SD2.x", ("SD20", "SD21UnclipL", "SD21UnclipH"), _unet_attention(), Recipe("tlora", 64, 32, 800, 768),
           "the paper's recipe at SD 2's size"),
    Family("SD-XL", ("SDXL", "SDXLRefiner", "SSD1B", "Segmind_Vega", "KOALA_700M", "KOALA_1B",
                     "SDXL_instructpix2pix"), _unet_attention(), PAPER, "the paper's recipe"),
    Family("Flux", ("Flux", "FluxSchnell", "FluxInpaint", "Chroma", "ChromaRadiance"),
           {"attention": _FLUX_ATTENTION,
            "attention+feedforward": _FLUX_ATTENTION + (
                TargetRule(r"double_blocks\.\d+\.txt_attn\.proj"),
                TargetRule(r"double_blocks\.\d+\.(img|txt)_mlp\.(0|2)"),
                TargetRule(r"single_blocks\.\d+\.linear1", "qkv_mlp", ("mlp",)),
                TargetRule(r"single_blocks\.\d+\.linear2"))},
           FLUX_REFERENCE, "the reference code's FLUX recipe; Chroma shares Flux's blocks", inplace_residuals=True),
    Family("SD3", ("SD3",),
           {"attention": _SD3_ATTENTION,
            "attention+feedforward": _SD3_ATTENTION + (
                TargetRule(r"joint_blocks\.\d+\.context_block\.attn\.proj"),
                TargetRule(r"joint_blocks\.\d+\.(x_block|context_block)\.mlp\.fc[12]"))},
           FLOW_DIT, "SD3 / SD3.5 (MMDiT, MMDiT-X's second attention too)"),
    Family("Lumina2", ("Lumina2", "ZImage"),
           {"attention": _LUMINA_ATTENTION,
            "attention+feedforward": _LUMINA_ATTENTION + (
                TargetRule(r"(layers|noise_refiner|context_refiner)\.\d+\.feed_forward\.w[123]"),)},
           FLOW_DIT, "Lumina 2 and Z-Image (NextDiT, grouped-query qkv)"),
    Family("QwenImage", ("QwenImage",),
           {"attention": _QWEN_ATTENTION,
            "attention+feedforward": _QWEN_ATTENTION + (
                TargetRule(r"transformer_blocks\.\d+\.attn\.to_add_out"),
                TargetRule(r"transformer_blocks\.\d+\.(img|txt)_mlp\.net\.(0\.proj|2)"))},
           FLOW_DIT, "Qwen-Image (separate q, k, v projections)"),
)
TARGET_SETS = ("attention", "attention+feedforward")


def family_named(name: str) -> Optional[Family]:
    """The family called `name` (a Family.name), or None."""
    return next((f for f in FAMILIES if f.name == name), None)


def family_for(config_class_names: list[str] | tuple[str, ...] | str) -> Optional[Family]:
    """The family of a model whose config class (and its bases, most specific first) has these names."""
    names = [config_class_names] if isinstance(config_class_names, str) else list(config_class_names)
    for name in names:
        for fam in FAMILIES:
            if name in fam.config_classes:
                return fam
    return None


def find_sites(diffusion_model: torch.nn.Module, rules: tuple[TargetRule, ...]) -> dict[str, Site]:
    """Every adapter site of `rules` in a diffusion model, in module order, keyed by layer key."""
    compiled = [(re.compile(rule.pattern), rule) for rule in rules]
    sites: dict[str, Site] = {}
    for path, module in diffusion_model.named_modules():
        weight = getattr(module, "weight", None)
        if weight is None or weight.dim() != 2:
            continue
        out_features, in_features = weight.shape
        for pattern, rule in compiled:
            if not pattern.fullmatch(path):
                continue
            for site in _rule_sites(rule, path, out_features, in_features):
                sites[site.layer_key] = site
    return sites


def _rule_sites(rule: TargetRule, path: str, out_features: int, in_features: int) -> Iterator[Site]:
    module_path = f"diffusion_model.{path}"
    if rule.layout is None:
        yield Site(module_path, module_path, None, in_features, out_features)
        return
    rows = fused_rows(rule.layout, out_features, in_features)
    for part in rule.parts:
        offset, size = rows[part]
        yield Site(f"{module_path}.{part}", module_path, (offset, size), in_features, size)


# ---- memory presets (the Train node's `memory` input) -----------------------------------------------

MEMORY_CARDS = (8, 12, 16, 24)  # GiB of the cards the presets are for


@dataclass(frozen=True)
class MemoryPreset:
    """What makes one training step of a family fit on a card: gradient checkpointing, a base loaded in
    fp8 (the Train node cannot change the model it receives, so it says in the log when the model is
    wider), and the largest training size in px (0: the recipe's). `fits` is False where even this is
    over the card by the estimate; ComfyUI then offloads weights and training runs slower."""

    gradient_checkpointing: bool = False
    fp8_base: bool = False
    max_resolution: int = 0
    fits: bool = True


@dataclass(frozen=True)
class MemoryTable:
    """A family's presets per card, and the GiB of one step without any (bf16 base, no checkpointing, the
    recipe's size): 'auto' changes nothing where that much is free."""

    as_loaded_gib: float
    cards: dict  # card GiB (MEMORY_CARDS) -> MemoryPreset


AS_LOADED = MemoryPreset()
CHECKPOINTING = MemoryPreset(gradient_checkpointing=True)
FP8_CHECKPOINTING = MemoryPreset(gradient_checkpointing=True, fp8_base=True)


def _fp8_at(px: int, fits: bool = True) -> MemoryPreset:
    return MemoryPreset(True, True, px, fits)


def _table(as_loaded_gib: float, *presets: MemoryPreset) -> MemoryTable:
    return MemoryTable(as_loaded_gib, dict(zip(MEMORY_CARDS, presets)))


# Filled from `benchmarks/memory_estimate.py` (one step on the meta device at the recipe's size; a card of
# N GiB holds N - 1). Keyed by family name, sized on the family's largest model (SD 1.5, SD 2.1, SD-XL,
# FLUX.1-dev, SD3.5 Large, Lumina 2, Qwen-Image), or by a config class whose models differ in size from
# the rest of their family (Z-Image; Flux.2 sized on Klein 9B; Wan 2.2 5B apart from the 14B models).
_NO_FIT = _fp8_at(512, fits=False)
MEMORY_PRESETS: dict[str, MemoryTable] = {
    # key: _table(GiB as loaded, 8 GB, 12 GB, 16 GB, 24 GB)
    "SD1.x": _table(5.4, AS_LOADED, AS_LOADED, AS_LOADED, AS_LOADED),
    "SD2.x": _table(9.3, CHECKPOINTING, AS_LOADED, AS_LOADED, AS_LOADED),
    "SD-XL": _table(20.7, FP8_CHECKPOINTING, CHECKPOINTING, CHECKPOINTING, AS_LOADED),
    "Flux": _table(111.6, _NO_FIT, _NO_FIT, _fp8_at(768), FP8_CHECKPOINTING),
    "Flux2": _table(93.9, _NO_FIT, _fp8_at(512), FP8_CHECKPOINTING, CHECKPOINTING),
    "SD3": _table(83.7, _NO_FIT, FP8_CHECKPOINTING, FP8_CHECKPOINTING, CHECKPOINTING),
    "Lumina2": _table(46.1, FP8_CHECKPOINTING, CHECKPOINTING, CHECKPOINTING, CHECKPOINTING),
    "ZImage": _table(79.0, _NO_FIT, FP8_CHECKPOINTING, FP8_CHECKPOINTING, CHECKPOINTING),
    "QwenImage": _table(134.8, _NO_FIT, _NO_FIT, _NO_FIT, _fp8_at(768)),
    "WAN21_T2V": _table(130.1, _NO_FIT, _NO_FIT, _NO_FIT, FP8_CHECKPOINTING),
    "WAN22_T2V": _table(23.3, FP8_CHECKPOINTING, CHECKPOINTING, CHECKPOINTING, CHECKPOINTING),
}


def memory_table(family_name: str, config_classes: tuple[str, ...] = ()) -> Optional[MemoryTable]:
    """The memory presets of a model: those of its config class (most specific first) where the table has
    one, else its family's (a Family.name); None where the table has neither yet."""
    for key in (*config_classes, family_name):
        if key in MEMORY_PRESETS:
            return MEMORY_PRESETS[key]
    return None

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

import dataclasses
import re
from dataclasses import dataclass
from typing import Iterator, Optional

import torch

from .errors import TLoraConfigError

# How a fused output splits into projections: name -> (offset, size) given (out_features, in_features).
# "qkv": q is as wide as the input (the model width); k and v share the rest (grouped-query attention
# gives them fewer heads). "qkv_mlp": Flux single blocks' linear1, q, k, v of the model width, then the MLP.
# "qkv_equal": three equal thirds whatever the input (Mochi's text-stream qkv_y reads a narrower text width).
# "kv": k and v halves (PixArt's and HunyuanDiT's cross-attention kv_linear / kv_proj).
FUSED_LAYOUTS = ("qkv", "qkv_mlp", "qkv_equal", "kv")
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
    if layout in ("qkv_equal", "kv"):
        n = 3 if layout == "qkv_equal" else 2
        size, rest = divmod(out_features, n)
        if rest or size <= 0:
            raise TLoraConfigError(f"a fused {layout} weight of {out_features} outputs does not split into {n} "
                                   f"equal parts; this model's layout is not supported.")
        return {part: (i * size, size) for i, part in enumerate(("q", "k", "v")[3 - n:])}
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
class OptimizerRecipe:
    """An optimiser as a reference recipe runs it: learning rate, decoupled weight decay and the gradient
    norm it clips to (0: no clipping). The learning rate stays constant in both reference recipes."""

    name: str
    learning_rate: float
    weight_decay: float = 1e-4
    max_grad_norm: float = 0.0


# The reference code's two optimisers. SD-XL (tlora/trainer_sdxl.py): AdamW 1e-4, wd 1e-4, no clipping.
# FLUX (flux/run.py, flux/optimizer/optimizer.py): Prodigy at lr 1.0, betas 0.9 / 0.999, wd 1e-4
# decoupled, bias correction and safeguard warm-up on, gradients clipped to norm 1.0.
OPTIMIZERS = {"adamw": OptimizerRecipe("adamw", 1e-4), "prodigy": OptimizerRecipe("prodigy", 1.0, max_grad_norm=1.0)}

# How a training step draws its noise level. "timestep": t uniform over the model's own training timesteps
# (SD-XL's reference: 0..999; LCM: its 50). "flow": sigma = k / 1000 with k uniform in 1..1000, unshifted,
# as the reference FLUX code draws it (weighting "none"), whatever shift the model samples with.
SIGMA_DRAWS = ("timestep", "flow")
# How the training square is cut from the photo. "centre": the largest centred square, once (SD-XL's
# reference). "random": the short side resized to the training size and a new random square every step
# (the reference FLUX transform).
CROPS = ("centre", "random")


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
    optimizer: str = "adamw"          # a key of OPTIMIZERS
    sigma_draw: str = "timestep"      # one of SIGMA_DRAWS
    crop: str = "centre"              # one of CROPS
    # SD-XL's size embedding as the reference passes it: original size = the source's centred square side,
    # crop corner (0, 0), target size = the training size.
    size_conditioning: bool = False

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
    # target set name -> tuple[TargetRule, ...]; "attention" is the paper's choice. None: the generic rule
    # (`generic_sites`) finds the layers from the model itself.
    targets: Optional[dict]
    recipe: Recipe
    note: str = ""
    # The model adds to its residual stream in place (ComfyUI's Flux blocks: `x += ...`) after saving
    # it for backward, which autograd refuses; training then keeps copies of the saved activations.
    inplace_residuals: bool = False
    # For the generic rule: fused weights whose split it cannot infer from names and shapes (pattern, layout).
    layouts: tuple[TargetRule, ...] = ()

    def sites(self, diffusion_model: torch.nn.Module, targets: str) -> dict[str, "Site"]:
        """Every adapter site of a target set in this family's diffusion model, in module order."""
        if self.targets is None:
            if targets not in TARGET_SETS:
                raise TLoraConfigError(f"targets {targets!r} are not defined; choose one of {', '.join(TARGET_SETS)}.")
            return generic_sites(diffusion_model, targets == "attention+feedforward", self.layouts)
        return find_sites(diffusion_model, self.rules(targets))

    def rules(self, targets: str) -> tuple[TargetRule, ...]:
        if self.targets is None:
            raise TLoraConfigError(f"{self.name} has no fixed target rules: its layers come from the generic rule "
                                   f"(Family.sites).")
        if targets not in self.targets:
            raise TLoraConfigError(f"targets {targets!r} are not defined for {self.name}; choose one of "
                                   f"{', '.join(self.targets)}.")
        return self.targets[targets]

    def all_rules(self) -> tuple[TargetRule, ...]:
        seen: dict = {}
        for rules in (self.targets or {}).values():
            for rule in rules:
                seen.setdefault(rule, None)
        return tuple(seen)


def _unet_attention() -> dict:
    attn = r".*\.attn[12]\.(to_q|to_k|to_v|to_out\.0)"
    return {"attention": (TargetRule(attn),),
            "attention+feedforward": (TargetRule(attn), TargetRule(r".*\.ff\.net\.(0\.proj|2)"))}


PAPER = Recipe("tlora", 64, 32, 800, 1024, size_conditioning=True)
UNET = Recipe("tlora", 64, 32, 800, 512)  # the paper's recipe at SD 1.x's size (SD 2.x: 768)
# The reference FLUX code's recipe: Prodigy, sigma = k / 1000 unshifted, a random crop every step.
# Previews: CFG 1 at ComfyUI's default guidance 3.5 for guidance-distilled Flux, CFG 4 for the other DiTs.
FLUX_REFERENCE = Recipe("vanilla_tlora", 32, 1, 1000, 1024, guidance=1.0, preview=Preview(cfg=1.0, guidance=3.5),
                        optimizer="prodigy", sigma_draw="flow", crop="random")
FLOW_DIT = dataclasses.replace(FLUX_REFERENCE, guidance=None,  # the FLUX recipe, for DiTs without guidance input
                               preview=Preview(cfg=4.0))
# The paper's recipe for noise-prediction DiTs (PixArt, Hunyuan-DiT): SD-XL's size embedding is SD-XL's alone.
NOISE_DIT = dataclasses.replace(PAPER, size_conditioning=False)
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
    Family("SD1.x", ("SD15", "SD15_instructpix2pix"), _unet_attention(), UNET,
           "the paper's recipe at SD 1.5's size"),
    Family("SD2.x", ("SD20", "SD21UnclipL", "SD21UnclipH"), _unet_attention(), dataclasses.replace(UNET, resolution=768),
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
    # Below: layers from the generic rule (targets None); an entry says only what differs, the recipe.
    Family("Flux2", ("Flux2",), None, FLUX_REFERENCE, "Flux.2 dev and Klein (Flux blocks, shared modulation)",
           inplace_residuals=True),
    Family("LongCat-Image", ("LongCatImage",), None, FLOW_DIT, "Flux blocks without guidance input",
           inplace_residuals=True),
    Family("HunyuanVideo", ("HunyuanVideo",), None, FLOW_DIT,
           "HunyuanVideo 1.0 / 1.5 and HunyuanImage 2.1 (Flux-style double and single blocks); trains from one "
           "image as a one-frame video", inplace_residuals=True),
    Family("Wan", ("WAN21_T2V",), None, FLOW_DIT,
           "Wan 2.1 / 2.2 and their variants (self- and cross-attention q, k, v, o); trains from one image as a "
           "one-frame video"),
    Family("HiDream", ("HiDream",), None, FLOW_DIT, "image and text streams' q, k, v, out"),
    Family("Kandinsky5", ("Kandinsky5",), None, FLOW_DIT, "Kandinsky 5 image and video"),
    Family("AuraFlow", ("AuraFlow",), None, FLOW_DIT, "MMDiT with w1q/w2q ... projections"),
    Family("Omnigen2", ("Omnigen2",), None, FLOW_DIT,
           "Omnigen 2 and Boogu (Boogu's joint attention: the image and instruction streams' q, k, v and outputs; "
           "the shared to_out after them sits outside that module and is not adapted)"),
    Family("GenmoMochi", ("GenmoMochi",), None, FLOW_DIT,
           "Mochi (qkv_x, and qkv_y reading the narrower text width; the T5 pooling's attention too)"),
    Family("LTXV", ("LTXV",), None, FLOW_DIT, "LTX-Video (residuals added in place)", inplace_residuals=True),
    Family("PixArt", ("PixArtAlpha",), None, NOISE_DIT, "PixArt α / Σ (noise prediction: the paper's recipe)"),
    Family("StableCascade", ("Stable_Cascade_C",), None, NOISE_DIT,
           "Stable Cascade stages C and B (Würstchen UNets; their attention blocks' to_q, to_k, to_v, out_proj): "
           "noise prediction, the paper's recipe"),
    Family("Cosmos", ("CosmosT2V", "CosmosT2IPredict2"), None, NOISE_DIT,
           "Cosmos 1 (EDM) and Cosmos Predict2 (rectified flow in sigma / (sigma + 1)), text to and image to video: "
           "not CONST flow, so the paper's recipe, noise drawn from the model's own sigma table"),
    Family("CogVideoX", ("CogVideoX_T2V",), None, NOISE_DIT,
           "CogVideoX text / image to video and inpainting (v-prediction on a DDPM table: the paper's recipe; q, k, v, "
           "attn_out)"),
    Family("HunyuanDiT", ("HunyuanDiT",), None, NOISE_DIT,
           "Hunyuan-DiT 1.0 / 1.1+ (noise prediction: the paper's recipe; the mT5 pooling's attention too)"),
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


# The generic rule: the attention projections of any transformer, read from its module tree and weight
# shapes. A Linear's role comes from its own name (the last path part; a trailing index such as
# `to_out.0` names the Sequential around it): q, k, v, output, fused qkv or fused kv, under the spellings
# ComfyUI's models use (to_q, q, q_proj, wq, w1q, to_query, add_q_proj, to_q_t, q_linear, qkv, Wqkv,
# qkv_x, img_attn_qkv, kv_linear, img_to_q, instruct_to_q, o, out, proj, to_out, out_proj, output_proj, out_layer,
# attn_out, img_out, ...). A module
# is an attention when its projections hold q, k and v (separate or fused); then every projection it
# holds is adapted, the text stream's too. A Flux-style single-stream block (linear1 = q, k, v and the
# MLP, linear2 beside it) gets q, k, v of linear1.
_ROLES = (
    ("qkv", re.compile(r"(?:\w+_)?w?qkv(?:_\w+)?", re.I)),
    ("kv", re.compile(r"(?:to_|add_)?w?kv(?:_proj|_linear)?", re.I)),
    ("q", re.compile(r"(?:img_|instruct_)?(?:to_|add_|linear_)?(?:w\d?)?(?:q|query)(?:_proj|_linear|_t|_x|_y)?", re.I)),
    ("k", re.compile(r"(?:img_|instruct_)?(?:to_|add_|linear_)?(?:w\d?)?(?:k|key)(?:_proj|_linear|_t|_x|_y|_img)?",
                     re.I)),
    ("v", re.compile(r"(?:img_|instruct_)?(?:to_|add_|linear_)?(?:w\d?)?(?:v|value)(?:_proj|_linear|_t|_x|_y|_img)?",
                     re.I)),
    ("out", re.compile(r"(?:to_|add_|to_add_)?(?:w\d?o|o|out|proj|output)(?:_proj|_layer|_t|_x|_y)?|"
                       r"(?:img|txt)_attn_proj|attn_out|(?:img|instruct)_out", re.I)),
)
_FEEDFORWARD = re.compile(r"(?:\w+_)?(?:mlp|ff|ffn|feed_forward|feedforward)(?:_\w+)?", re.I)
_PARTS = {"qkv": QKV, "qkv_equal": QKV, "qkv_mlp": QKV, "kv": ("k", "v")}


def _role_of(path: str) -> tuple[str, Optional[str]]:
    """(attention module path, role) of a Linear from its name; role None when the name is no projection."""
    parts = path.split(".")
    if len(parts) > 1 and parts[-1].isdigit():
        parts = parts[:-1]
    name = parts[-1]
    role = next((r for r, pattern in _ROLES if pattern.fullmatch(name)), None)
    return ".".join(parts[:-1]), role


def infer_qkv_layout(out_features: int, in_features: int) -> Optional[str]:
    """How a fused qkv weight splits: q as wide as the input and k, v no wider (grouped-query too), else
    three equal parts (a qkv reading another width, Mochi's text stream); None when neither fits."""
    kv, rest = divmod(out_features - in_features, 2)
    if out_features > in_features and not rest and 0 < kv <= in_features:
        return "qkv"
    return "qkv_equal" if out_features % 3 == 0 else None


def _attention_choices(linears: dict, layouts: tuple[TargetRule, ...]) -> dict[str, tuple[Optional[str], tuple]]:
    """path -> (layout, parts) of every projection in an attention module, and of single-stream linear1."""
    by_parent: dict[str, dict[str, str]] = {}
    for path in linears:
        parent, role = _role_of(path)
        if role is not None:
            by_parent.setdefault(parent, {})[path] = role
    chosen: dict[str, tuple[Optional[str], tuple]] = {}
    for members in by_parent.values():
        roles = set(members.values())
        if not ({"q", "k", "v"} <= roles or "qkv" in roles or {"q", "kv"} <= roles):
            continue
        for path, role in members.items():
            out_features, in_features = linears[path]
            layout = infer_qkv_layout(out_features, in_features) if role == "qkv" else "kv" if role == "kv" else None
            if role in ("qkv", "kv") and layout is None:
                raise TLoraConfigError(f"{path}: a fused {role} weight of {out_features} x {in_features} splits no "
                                       f"way the generic rule knows; give the family a layout for it.")
            chosen[path] = (layout, _PARTS.get(layout, ()))
    for path, (out_features, in_features) in linears.items():
        parent, _, name = path.rpartition(".")
        if name == "linear1" and f"{parent}.linear2" in linears and out_features > 3 * in_features:
            chosen.setdefault(path, ("qkv_mlp", QKV))
    for path in chosen:  # the family's own layouts win over inferred ones
        rule = next((r for r in layouts if re.fullmatch(r.pattern, path)), None)
        if rule is not None:
            chosen[path] = (rule.layout, rule.parts or _PARTS.get(rule.layout, ()))
    return chosen


def generic_sites(diffusion_model: torch.nn.Module, feedforward: bool = False,
                  layouts: tuple[TargetRule, ...] = ()) -> dict[str, Site]:
    """Adapter sites of the generic rule, in module order: attention projections (each part of a fused
    weight on its own rows); with `feedforward`, also every Linear under an MLP / feed-forward module,
    single-stream blocks' linear1 MLP part and linear2."""
    linears = {path: tuple(m.weight.shape) for path, m in diffusion_model.named_modules()
               if isinstance(m, torch.nn.Linear) and getattr(m, "weight", None) is not None and m.weight.dim() == 2}
    chosen = _attention_choices(linears, layouts)
    if feedforward:
        for path, (layout, parts) in list(chosen.items()):
            if layout == "qkv_mlp":
                chosen[path] = (layout, parts + ("mlp",))
                chosen.setdefault(path.rsplit(".", 1)[0] + ".linear2", (None, ()))
        for path in linears:
            if path not in chosen and any(_FEEDFORWARD.fullmatch(p) for p in path.split(".")[:-1]):
                chosen[path] = (None, ())
    sites: dict[str, Site] = {}
    for path, (out_features, in_features) in linears.items():
        if path in chosen:
            layout, parts = chosen[path]
            for site in _rule_sites(TargetRule(re.escape(path), layout, parts), path, out_features, in_features):
                sites[site.layer_key] = site
    return sites


def generic_family(config_class: str, flow: bool) -> Family:
    """The entry for a model class the table does not list: the generic rule, and the FLUX recipe for a
    flow model or the paper's SD-XL recipe for a noise-prediction one."""
    return Family(config_class, (config_class,), None, FLOW_DIT if flow else NOISE_DIT,
                  "not in the table: layers from the generic rule")


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
# N GiB holds N - 1), recounted 2026-12-05 with attention as CUDA's fused kernels keep it, the adapters' saved
# inputs, the recomputed block's own activations, the step's working set and saved weights counted once
# (benchmarks/README.md says what each changed). Keyed by family name, sized on the family's largest model
# (SD 1.5, SD 2.1, SD-XL, FLUX.1-dev, SD3.5 Large, Lumina 2, Qwen-Image, HunyuanVideo 13B, Kandinsky 5 Video
# Pro, LTX-Video 13B, Cosmos 1 14B, ...), or by a config class whose models differ in size from the rest of
# their family (Z-Image; Flux.2 sized on Klein 9B; Wan 2.2 5B apart from the 14B models; HunyuanImage 2.1 and
# HunyuanVideo 1.5 apart from HunyuanVideo 1.0; Cosmos Predict2, sized on its 14B, apart from Cosmos 1).
# Kandinsky 5, LongCat-Image and CogVideoX counted on ComfyUI 0.33.0, the rest on 0.3.75. Families without a
# row: tests/test_memory_presets.py names them with the reason.
_NO_FIT = _fp8_at(512, fits=False)
_WAN_14B = _table(64.2, _NO_FIT, _NO_FIT, _NO_FIT, FP8_CHECKPOINTING)  # Wan 2.1 / 2.2 14B (one expert), one frame
_COSMOS_14B = _table(63.5, _NO_FIT, _NO_FIT, _NO_FIT, FP8_CHECKPOINTING)  # Cosmos 1 and Predict2 14B, one frame
MEMORY_PRESETS: dict[str, MemoryTable] = {
    # key: _table(GiB as loaded, 8 GB, 12 GB, 16 GB, 24 GB)
    "SD1.x": _table(2.7, AS_LOADED, AS_LOADED, AS_LOADED, AS_LOADED),
    "SD2.x": _table(3.7, AS_LOADED, AS_LOADED, AS_LOADED, AS_LOADED),
    "SD-XL": _table(12.9, FP8_CHECKPOINTING, CHECKPOINTING, AS_LOADED, AS_LOADED),
    "Flux": _table(46.2, _NO_FIT, _NO_FIT, _fp8_at(768), FP8_CHECKPOINTING),
    "Flux2": _table(41.2, _NO_FIT, _NO_FIT, FP8_CHECKPOINTING, CHECKPOINTING),
    "SD3": _table(28.0, _NO_FIT, FP8_CHECKPOINTING, FP8_CHECKPOINTING, CHECKPOINTING),
    "Lumina2": _table(20.7, CHECKPOINTING, CHECKPOINTING, CHECKPOINTING, AS_LOADED),
    "ZImage": _table(38.9, _NO_FIT, FP8_CHECKPOINTING, CHECKPOINTING, CHECKPOINTING),
    "QwenImage": _table(64.3, _NO_FIT, _NO_FIT, _NO_FIT, _fp8_at(768)),
    "Wan": _WAN_14B,
    "WAN21_T2V": _WAN_14B,
    "WAN22_T2V": _table(14.9, FP8_CHECKPOINTING, CHECKPOINTING, AS_LOADED, AS_LOADED),
    "HunyuanVideo": _table(48.0, _NO_FIT, _NO_FIT, _fp8_at(512), FP8_CHECKPOINTING),  # 1.0, 13 B, one frame
    "HunyuanImage21": _table(41.8, _NO_FIT, _NO_FIT, _NO_FIT, FP8_CHECKPOINTING),  # 17 B
    "HunyuanVideo15": _table(31.8, _NO_FIT, FP8_CHECKPOINTING, FP8_CHECKPOINTING, CHECKPOINTING),  # 8.3 B, one frame
    "Kandinsky5": _table(83.2, _NO_FIT, _NO_FIT, _NO_FIT, _fp8_at(512)),  # Video Pro 19 B, one frame
    "AuraFlow": _table(30.1, _NO_FIT, FP8_CHECKPOINTING, FP8_CHECKPOINTING, CHECKPOINTING),
    "PixArt": _table(5.9, AS_LOADED, AS_LOADED, AS_LOADED, AS_LOADED),  # PixArt-Sigma 1024
    "LongCat-Image": _table(24.1, _NO_FIT, FP8_CHECKPOINTING, CHECKPOINTING, CHECKPOINTING),
    "Omnigen2": _table(28.5, FP8_CHECKPOINTING, CHECKPOINTING, CHECKPOINTING, CHECKPOINTING),
    "GenmoMochi": _table(51.5, _NO_FIT, _NO_FIT, FP8_CHECKPOINTING, CHECKPOINTING),  # one frame
    "LTXV": _table(36.1, _NO_FIT, _NO_FIT, _NO_FIT, FP8_CHECKPOINTING),  # 13 B, one frame
    "HunyuanDiT": _table(13.4, CHECKPOINTING, CHECKPOINTING, AS_LOADED, AS_LOADED),  # v1.2
    "CogVideoX": _table(26.7, _NO_FIT, FP8_CHECKPOINTING, CHECKPOINTING, CHECKPOINTING),  # 5B, one frame
    "Cosmos": _COSMOS_14B,  # Cosmos 1 Text2World 14B
    "CosmosT2IPredict2": _COSMOS_14B,  # Predict2 14B (the 2B fits 8 GB with checkpointing)
    "StableCascade": _table(10.6, FP8_CHECKPOINTING, AS_LOADED, AS_LOADED, AS_LOADED),  # stage C, 3.6 B
}


def memory_table(family_name: str, config_classes: tuple[str, ...] = ()) -> Optional[MemoryTable]:
    """The memory presets of a model: those of its config class (most specific first) where the table has
    one, else its family's (a Family.name); None where the table has neither yet."""
    for key in (*config_classes, family_name):
        if key in MEMORY_PRESETS:
            return MEMORY_PRESETS[key]
    return None

"""Tiny random-weight models of the DiT families, built by ComfyUI itself (both hosts).

The host's own detector reads a few shaped (meta) tensors named as in a real checkpoint, so it picks
the family's config class (Flux or FluxSchnell, SD3, Lumina2, QwenImage) and fills every setting the
host needs; only the sizes are then shrunk (`overrides`: width, heads, depth). The host's config class
builds the BaseModel with its own operations, so weights can be stored as fp8 exactly as a user's fp8
checkpoint loads. Each entry also makes the CONDITIONING its text encoder would give (random
tensors of the right widths), so no text encoder is needed.
"""
from __future__ import annotations

import types
from dataclasses import dataclass, field

import torch

from support.tiny_model import _random_state_dict


@dataclass
class TinyFamily:
    name: str
    keys: dict        # checkpoint key -> shape, what the host's detector reads
    overrides: dict   # smaller sizes than the detector assumes
    context: int      # text-encoder width
    pooled: int = 0   # pooled text width (0: none)
    extra_cond: dict = field(default_factory=dict)
    config_class: str = ""  # force this supported_models class (Z-Image's is chosen by width alone)
    frames: bool = False    # latents carry a time axis, [batch, channels, 1, height, width] (Wan's format)
    unet_config: dict = field(default_factory=dict)  # a full config instead of the detector's (with config_class)
    downscale: int = 8      # image pixels per latent cell along each side (1: a pixel-space model)
    # parameters (name suffixes) set to 1 after the random init, e.g. RMS-norm scales that would otherwise be drawn
    # as small vectors and shrink a head's output until a T-LoRA's effect is lost in rounding
    ones: tuple = ()


H = 256  # Flux / Qwen head dim is fixed at 128 by their rope axes: 2 heads

# SD-XL's detector matches only its full depth, so the tiny UNet's config is given whole: SD-XL's widths
# where the family is decided (cross-attention on 2048-wide text, the 2816-wide pooled + size input,
# linear projections in and out), one level of one block otherwise.
TINY_SDXL_UNET = {
    "image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 64, "num_res_blocks": [1],
    "channel_mult": [1], "transformer_depth": [1], "transformer_depth_output": [1, 1], "transformer_depth_middle": 1,
    "use_linear_in_transformer": True, "context_dim": 2048, "num_heads": -1, "num_head_channels": 32,
    "use_spatial_transformer": True, "legacy": False, "adm_in_channels": 2816, "num_classes": "sequential",
    "use_checkpoint": False, "use_temporal_resblock": False, "use_temporal_attention": False,
}

TINY = {
    "sdxl": TinyFamily("sdxl", {}, {}, context=2048, pooled=1280, config_class="SDXL", unet_config=TINY_SDXL_UNET),
    "flux_dev": TinyFamily(
        "flux_dev",
        {"double_blocks.0.img_attn.norm.key_norm.scale": (128,), "img_in.weight": (H, 64),
         "txt_in.weight": (H, 64), "vector_in.in_layer.weight": (H, 32), "guidance_in.in_layer.weight": (H, 256),
         "single_blocks.0.linear1.weight": (1, 1)},
        {"num_heads": 2, "depth": 1, "depth_single_blocks": 2}, context=64, pooled=32,
        extra_cond={"guidance": 3.5}),
    "flux_schnell": TinyFamily(
        "flux_schnell",
        {"double_blocks.0.img_attn.norm.key_norm.scale": (128,), "img_in.weight": (H, 64),
         "txt_in.weight": (H, 64), "vector_in.in_layer.weight": (H, 32), "single_blocks.0.linear1.weight": (1, 1)},
        {"num_heads": 2, "depth": 1, "depth_single_blocks": 1}, context=64, pooled=32),
    "sd35": TinyFamily(  # MMDiT-X: joint block 0 has the second attention of SD3.5 Medium
        "sd35",
        {"joint_blocks.0.context_block.attn.qkv.weight": (384, 128), "joint_blocks.1.context_block.attn.qkv.weight":
         (384, 128), "x_embedder.proj.weight": (128, 16, 2, 2), "final_layer.linear.weight": (64, 128),
         "y_embedder.mlp.0.weight": (128, 32), "context_embedder.weight": (128, 64), "pos_embed": (1, 256, 128),
         "joint_blocks.0.context_block.attn.ln_q.weight": (64,), "joint_blocks.0.x_block.attn2.qkv.weight": (384, 128)},
        {}, context=64, pooled=32),
    "lumina2": TinyFamily(
        "lumina2",
        {"cap_embedder.1.weight": (96, 64), "layers.0.attention.qkv.weight": (1, 1),
         "noise_refiner.0.attention.k_norm.weight": (1,)},
        {"n_heads": 4, "n_kv_heads": 2, "axes_dims": [8, 8, 8], "axes_lens": [300, 64, 64], "rope_theta": 10000.0,
         "ffn_dim_multiplier": 1.0, "multiple_of": 32, "n_refiner_layers": 1}, context=64),
    "zimage": TinyFamily(
        "zimage",
        {"cap_embedder.1.weight": (256, 64), "layers.0.attention.qkv.weight": (1, 1),
         "noise_refiner.0.attention.k_norm.weight": (1,)},
        {"n_heads": 4, "n_kv_heads": 4, "axes_dims": [16, 24, 24], "axes_lens": [300, 64, 64], "rope_theta": 256.0,
         "ffn_dim_multiplier": 1.0, "multiple_of": 32, "n_refiner_layers": 1, "z_image_modulation": True,
         "time_scale": 1000.0}, context=64, config_class="ZImage"),
    "qwen_image": TinyFamily(
        "qwen_image",
        {"txt_norm.weight": (64,), "img_in.weight": (H, 64), "transformer_blocks.0.attn.to_q.weight": (1, 1)},
        {"attention_head_dim": 128, "num_attention_heads": 2, "joint_attention_dim": 64}, context=64, frames=True),
}


def _meta_state_dict(keys: dict) -> dict:
    return {k: torch.empty(shape, device="meta") for k, shape in keys.items()}


def build(name, seed: int = 0, weight_dtype: torch.dtype = torch.float32, compute_dtype=None):
    """(ModelPatcher, TinyFamily) of a tiny random model of family `name` (a key of TINY, or a TinyFamily)."""
    return build_spec(TINY[name] if isinstance(name, str) else name, seed, weight_dtype, compute_dtype)


def build_spec(spec: TinyFamily, seed: int = 0, weight_dtype: torch.dtype = torch.float32, compute_dtype=None):
    """(ModelPatcher, TinyFamily) of the tiny random model a TinyFamily describes."""
    import comfy.model_detection
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models

    sd = _meta_state_dict(spec.keys)
    unet_config = dict(spec.unet_config) or comfy.model_detection.detect_unet_config(sd, "")
    unet_config.update(spec.overrides)
    if spec.config_class:
        model_config = getattr(comfy.supported_models, spec.config_class)(unet_config)
    else:
        model_config = comfy.model_detection.model_config_from_unet_config(unet_config, sd)
    if model_config is None:
        raise RuntimeError(f"ComfyUI found no model config for tiny {spec.name}: {unet_config}")
    model_config.set_inference_dtype(weight_dtype, compute_dtype)
    model = model_config.get_model({}, "", device=torch.device("cpu"))
    gen = torch.Generator().manual_seed(seed)
    values = _random_state_dict(model.diffusion_model, gen)
    values.update({k: torch.ones_like(v) for k, v in values.items() if k.endswith(spec.ones)})
    with torch.no_grad():
        for key, param in model.diffusion_model.state_dict().items():
            if key in values:
                param.copy_(values[key].to(param.dtype))
            elif param.is_floating_point():  # buffers (SD3's pos_embed) start as uninitialised memory
                param.copy_((torch.randn(param.shape, generator=gen) * 0.02).to(param.dtype))
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                               offload_device=mm.unet_offload_device())
    return patcher, spec


def conditioning(spec: TinyFamily, seed: int = 0, tokens: int = 8):
    """The CONDITIONING the family's text encoder would hand on: [[context, {pooled, ...}]]."""
    gen = torch.Generator().manual_seed(seed)
    extra = dict(spec.extra_cond)
    if spec.pooled:
        extra["pooled_output"] = torch.randn(1, spec.pooled, generator=gen)
    return [[torch.randn(1, tokens, spec.context, generator=gen), extra]]


def latent_shape(patcher, spec: TinyFamily, n: int, size: int) -> tuple:
    """The shape of n latents of a size x size px image for this model."""
    channels = patcher.model.latent_format.latent_channels
    side = size // spec.downscale
    return (n, channels, 1, side, side) if spec.frames else (n, channels, side, side)


def stub_vae(patcher, spec: TinyFamily, seed: int = 0):
    """A VAE stand-in: encode() gives fixed random latents of the model's channels at 1/downscale size (height
    and width: a wide image gives wide latents); decode()
    an image that depends on every latent value (the first three channels, squashed, nearest), with a
    frame axis for latents that have one, as ComfyUI's video-capable VAEs return."""
    def encode(pixels):
        gen = torch.Generator().manual_seed(seed)
        shape = latent_shape(patcher, spec, pixels.shape[0], pixels.shape[1])[:-1] + (pixels.shape[2] // spec.downscale,)
        return torch.randn(shape, generator=gen)

    def decode(latents):
        rgb = torch.sigmoid(0.25 * (latents[:, :3] + latents.mean(dim=1, keepdim=True)))
        rgb = rgb.repeat_interleave(spec.downscale, dim=-1).repeat_interleave(spec.downscale, dim=-2)
        return rgb.movedim(1, -1)  # [n, (frames,) H, W, 3]
    return types.SimpleNamespace(encode=encode, decode=decode)

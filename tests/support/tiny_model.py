"""A tiny SD1.5 checkpoint with random weights, built from ComfyUI's own model classes.

ComfyUI's CheckpointLoaderSimple detects the model family from tensor names and shapes, so the UNet
keeps what SD15 detection looks at (model_channels 320, context_dim 768, conv proj_in/proj_out,
no ADM input) and only shrinks depth: 1 level with 1 res block (~25.8 M parameters instead of
859.5 M). The text encoder is the full CLIP-L (its config is fixed by ComfyUI, 123.7 M). The VAE is
a TAESD (2.4 M), which ComfyUI picks from the `first_stage_model.taesd_*` keys.

Weights are drawn from one seeded CPU generator over the sorted tensor names, so a seed always gives
the same file (for a given torch version). Needs ComfyUI importable (see support.comfy_env).

    python tests/support/tiny_model.py out/tiny_sd15.safetensors   # build one by hand
"""
import math

import torch

UNET_PREFIX = "model.diffusion_model."
CLIP_PREFIX = "cond_stage_model."
VAE_PREFIX = "first_stage_model."

# What comfy.model_detection.detect_unet_config reports for the tiny UNet; SD15's own keys
# (context_dim, model_channels, use_linear_in_transformer, adm_in_channels) are the real values.
TINY_UNET_CONFIG = {
    "image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 320,
    "num_res_blocks": [1], "channel_mult": [1], "transformer_depth": [1], "transformer_depth_output": [1, 1],
    "transformer_depth_middle": 1, "use_linear_in_transformer": False, "context_dim": 768,
    "num_heads": 8, "num_head_channels": -1, "use_spatial_transformer": True, "legacy": False,
    "adm_in_channels": None, "use_checkpoint": False,
    "use_temporal_resblock": False, "use_temporal_attention": False,
}

# TAESD latents for SD1.x are scaled like the full VAE's (ComfyUI's VAELoader sets the same values).
SD15_VAE_SCALE, SD15_VAE_SHIFT = 0.18215, 0.0


def _random_state_dict(module: torch.nn.Module, gen: torch.Generator) -> dict:
    """Fresh values for every parameter of `module`, by kind (ComfyUI's ops skip init on purpose).

    Norms start at identity (weight 1, bias 0); embeddings ~ N(0, 0.02); matrices and kernels
    ~ N(0, 1/fan_in) so activations keep their scale through the stack; other vectors (biases)
    ~ N(0, 0.02) so that bias patches are visible. Output layers are NOT zeroed, unlike training
    init: the tests need a model whose prediction depends on every layer.
    """
    kinds = {}
    for mod_name, mod in module.named_modules():
        for p_name, _ in mod.named_parameters(recurse=False):
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            if isinstance(mod, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
                kinds[full] = "norm_" + p_name
            elif isinstance(mod, torch.nn.Embedding):
                kinds[full] = "embedding"
    out = {}
    for name, param in sorted(module.named_parameters()):
        shape, kind = tuple(param.shape), kinds.get(name)
        if kind == "norm_weight":
            value = torch.ones(shape)
        elif kind == "norm_bias":
            value = torch.zeros(shape)
        elif kind == "embedding" or len(shape) < 2:
            value = torch.randn(shape, generator=gen) * 0.02
        else:
            fan_in = math.prod(shape[1:])
            value = torch.randn(shape, generator=gen) / math.sqrt(fan_in)
        out[name] = value
    return out


def _unet_tensors(gen):
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    unet = UNetModel(**TINY_UNET_CONFIG, dtype=torch.float32, device="cpu", operations=comfy.ops.disable_weight_init)
    return _random_state_dict(unet, gen)


def _clip_tensors(gen):
    import comfy.sd1_clip

    clip = comfy.sd1_clip.SDClipModel(device="cpu", dtype=torch.float32)
    sd = _random_state_dict(clip, gen)
    # Not part of SD1.5 checkpoints; ComfyUI drops them when it saves one too.
    sd.pop("logit_scale", None)
    sd.pop("transformer.text_projection.weight", None)
    return sd


def _taesd_tensors(gen):
    import comfy.taesd.taesd

    taesd = comfy.taesd.taesd.TAESD(latent_channels=4)
    sd = _random_state_dict(taesd, gen)
    sd["vae_scale"] = torch.tensor(SD15_VAE_SCALE)
    sd["vae_shift"] = torch.tensor(SD15_VAE_SHIFT)
    return sd


def build_tiny_sd15_state_dict(dtype=torch.float16, seed=0) -> dict:
    """The checkpoint's tensors, named like an SD1.5 .ckpt/.safetensors, in `dtype`."""
    sd = {}
    # One generator per part, so changing one part's architecture leaves the others' values alone.
    for part, (prefix, build) in enumerate([(UNET_PREFIX, _unet_tensors), (CLIP_PREFIX, _clip_tensors),
                                            (VAE_PREFIX, _taesd_tensors)]):
        gen = torch.Generator(device="cpu").manual_seed(seed * 1000 + part)
        for k, v in build(gen).items():
            sd[prefix + k] = v.to(dtype).contiguous()
    return sd


def build_tiny_sd15_checkpoint(path, dtype=torch.float16, seed=0):
    """Write the tiny SD1.5 checkpoint to `path` (.safetensors) and return the path."""
    from safetensors.torch import save_file

    save_file(build_tiny_sd15_state_dict(dtype=dtype, seed=seed), str(path), metadata={"format": "pt"})
    return path


def build_tiny_sd15(dtype=torch.float32, seed=0):
    """(model_patcher, clip, vae) straight from memory, loaded through ComfyUI's checkpoint path.

    Every part is loaded in `dtype` (ComfyUI would otherwise keep the text encoder in fp16 on a CPU).
    Values are those of the fp16 file for the same seed when `dtype` is fp32 (stored as fp16 first).
    """
    import comfy.sd

    sd = build_tiny_sd15_state_dict(dtype=torch.float16, seed=seed)
    sd = {k: v.to(dtype) for k, v in sd.items()}
    out = comfy.sd.load_state_dict_guess_config(sd, model_options={"dtype": dtype},
                                                te_model_options={"dtype": dtype})
    if out is None:
        raise RuntimeError("ComfyUI did not recognise the tiny SD1.5 state dict")
    return out[0], out[1], out[2]


def detect(path_or_sd):
    """ComfyUI's verdict on a checkpoint: (model config class name, detected unet config)."""
    import comfy.model_detection
    import comfy.utils

    sd = comfy.utils.load_torch_file(str(path_or_sd)) if not isinstance(path_or_sd, dict) else path_or_sd
    prefix = comfy.model_detection.unet_prefix_from_state_dict(sd)
    config = comfy.model_detection.model_config_from_unet(sd, prefix)
    return (type(config).__name__ if config is not None else None,
            comfy.model_detection.detect_unet_config(sd, prefix))


def make_sample_image(path, size=256):
    """A synthetic RGB PNG: a warm disc and a dark square on a blue-green gradient. No downloads."""
    import numpy as np
    from PIL import Image

    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
    img = np.stack([0.15 + 0.2 * xx, 0.35 + 0.3 * yy, 0.6 - 0.2 * xx], axis=-1)
    disc = (xx - 0.4) ** 2 + (yy - 0.45) ** 2 < 0.22 ** 2
    img[disc] = (0.95, 0.55, 0.15)
    square = (xx > 0.62) & (xx < 0.85) & (yy > 0.6) & (yy < 0.83)
    img[square] = (0.1, 0.1, 0.12)
    Image.fromarray((img * 255).round().astype(np.uint8), "RGB").save(str(path))
    return path


if __name__ == "__main__":
    import argparse
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from support.comfy_env import setup_comfy

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fp32", action="store_true", help="store fp32 instead of fp16")
    cli = parser.parse_args()
    setup_comfy()
    build_tiny_sd15_checkpoint(cli.path, dtype=torch.float32 if cli.fp32 else torch.float16, seed=cli.seed)
    print(cli.path, detect(cli.path)[0])

"""CLIP image and text towers with random weights, built from ComfyUI's own classes, for Evaluate T-LoRA.

- `tiny_clip_vision()`: a ComfyUI ClipVisionModel (CLIP_VISION) of a few thousand parameters, in process.
- `write_clip_vit_l(folder)`: two files a real server loads with its own loaders: the ViT-L/14 image tower
  (CLIPVisionLoader picks its config by layer count, so it keeps the real size, 303 M) and the CLIP-L text
  tower WITH its text projection (CLIPLoader, type stable_diffusion), as openai's clip-vit-large-patch14
  file holds them. Random weights: the pair is a twin only in shape, which is all the tests need.
"""
import json
from pathlib import Path

import torch

from support.tiny_model import _random_state_dict

PROJECTION = 768  # CLIP-L's joint space: the tiny SD1.5's text tower pools to 768 values
TINY_VISION = {"model_type": "clip_vision_model", "hidden_act": "quick_gelu", "hidden_size": 32,
               "intermediate_size": 64, "num_attention_heads": 2, "num_hidden_layers": 2, "image_size": 32,
               "patch_size": 8, "num_channels": 3, "layer_norm_eps": 1e-5, "projection_dim": PROJECTION}


def tiny_clip_vision(folder: Path, seed: int = 0):
    """A CLIP_VISION as CLIPVisionLoader returns it, with a tiny config written to `folder`."""
    import comfy.clip_vision

    config = Path(folder) / f"tiny_clip_vision_{seed}.json"
    config.write_text(json.dumps(TINY_VISION))
    vision = comfy.clip_vision.ClipVisionModel(str(config))
    vision.load_sd(_random_state_dict(vision.model, torch.Generator().manual_seed(seed)))
    return vision


def write_clip_vit_l(folder: Path, seed: int = 0) -> tuple[Path, Path]:
    """(image tower file, text tower file) in fp16, HF CLIPModel key names."""
    import comfy.clip_model
    import comfy.ops
    from safetensors.torch import save_file

    comfy_dir = Path(comfy.clip_model.__file__).parent
    vision_cfg = json.loads((comfy_dir / "clip_vision_config_vitl.json").read_text())
    text_cfg = json.loads((comfy_dir / "sd1_clip_config.json").read_text())
    gen = torch.Generator().manual_seed(seed)
    out = []
    for name, build in (("clip_vit_l_vision.safetensors",
                         lambda: comfy.clip_model.CLIPVisionModelProjection(vision_cfg, torch.float32, "cpu",
                                                                            comfy.ops.disable_weight_init)),
                        ("clip_vit_l_text.safetensors",
                         lambda: comfy.clip_model.CLIPTextModel(text_cfg, torch.float32, "cpu",
                                                                comfy.ops.disable_weight_init))):
        sd = {k: v.half().contiguous() for k, v in _random_state_dict(build(), gen).items()}
        path = Path(folder) / name
        save_file(sd, str(path))
        out.append(path)
    return out[0], out[1]

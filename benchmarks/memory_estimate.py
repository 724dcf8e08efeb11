"""GPU memory and compute of one T-LoRA training step at 1024 px, counted on the meta device.

    python benchmarks/memory_estimate.py          # FLUX.1-dev (fp8 base) and SD-XL (bf16), with and without
                                                  # gradient checkpointing

No weights, no GPU: the real-size diffusion model is built by the ComfyUI found at $TLORA_COMFYUI_DIR (or
.deps/ComfyUI) on the meta device, and one forward + backward is traced. FLOPs come from
torch.utils.flop_counter; activation memory is the bytes autograd keeps for backward (each storage once),
measured with saved-tensor hooks, the way the trainer runs: without checkpointing every block's
activations, with it (trainer.train.checkpointed_blocks) the block inputs plus, during backward, the
largest single block's activations. The T-LoRA is the family's recipe on the family's attention targets
(tlora_core.families); its parameters, gradients and AdamW states are fp32. Text encoders and the VAE run
once before training and ComfyUI unloads them when the diffusion model needs the room, so they are left
out (they are listed). Goals (issue 12): FLUX.1-dev fits in 24 GiB, SD-XL in 12 GiB.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
import conftest  # noqa: E402,F401  (ComfyUI on the path, the pack as `tlora_pack`, CPU flags)

GIB = 2 ** 30
FP8 = getattr(torch, "float8_e4m3fn", None)


def flux_dev_meta():
    """FLUX.1-dev's diffusion model at full size on the meta device, configured by the host's detector."""
    import comfy.model_detection
    import comfy.ops
    from comfy.ldm.flux.model import Flux

    keys = {"double_blocks.0.img_attn.norm.key_norm.scale": (128,), "img_in.weight": (3072, 64),
            "txt_in.weight": (3072, 4096), "vector_in.in_layer.weight": (3072, 768),
            "guidance_in.in_layer.weight": (3072, 256)}
    keys.update({f"double_blocks.{i}.img_attn.qkv.weight": (9216, 3072) for i in range(19)})
    keys.update({f"single_blocks.{i}.linear1.weight": (21504, 3072) for i in range(38)})
    config = comfy.model_detection.detect_unet_config({k: torch.empty(s, device="meta") for k, s in keys.items()}, "")
    config = {k: v for k, v in config.items() if k != "image_model"}
    with torch.device("meta"):
        model = Flux(**config, dtype=torch.bfloat16, operations=comfy.ops.disable_weight_init)
        inputs = dict(x=torch.zeros(1, 16, 128, 128, dtype=torch.bfloat16, requires_grad=True),
                      timestep=torch.zeros(1), context=torch.zeros(1, 512, 4096, dtype=torch.bfloat16),
                      y=torch.zeros(1, 768, dtype=torch.bfloat16), guidance=torch.ones(1))
    return model, inputs, "Flux"


def sdxl_meta():
    """SD-XL's UNet at full size on the meta device."""
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    from train_step import SDXL_UNET  # benchmarks/ is on sys.path when this file runs
    with torch.device("meta"):
        model = UNetModel(**SDXL_UNET, dtype=torch.bfloat16, operations=comfy.ops.disable_weight_init)
        inputs = dict(x=torch.zeros(1, 4, 128, 128, dtype=torch.bfloat16, requires_grad=True),
                      timesteps=torch.zeros(1), context=torch.zeros(1, 77, 2048, dtype=torch.bfloat16),
                      y=torch.zeros(1, 2816, dtype=torch.bfloat16))
    return model, inputs, "SDXL"


def traced_step(model, inputs, checkpointing: bool, copy_saved: bool):
    """(FLOPs of forward + backward, bytes kept for backward, largest block's own bytes)."""
    from torch.utils.flop_counter import FlopCounterMode

    from tlora_pack.trainer.train import checkpointed_blocks

    model.requires_grad_(False)
    storages: dict = {}

    def keep(tensor):
        storages[tensor.untyped_storage()._cdata] = tensor.untyped_storage().nbytes()
        return tensor
    with FlopCounterMode(display=False) as counter, checkpointed_blocks(model, checkpointing, copy_saved):
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
            out = model(**inputs)
        kept = sum(storages.values())
        out.float().sum().backward()
    # what one block keeps while it is recomputed in backward
    block_bytes = _largest_block(model, inputs) if checkpointing else 0
    return counter.get_total_flops(), kept, block_bytes


def _largest_block(model, inputs) -> int:
    """Bytes a single block keeps for backward, the largest over the model (recorded per block in one
    plain forward)."""
    from tlora_pack.trainer.train import checkpoint_units

    per_unit: dict = {}
    current = [None]

    def keep(tensor):
        if current[0] is not None:
            per_unit.setdefault(current[0], {})[tensor.untyped_storage()._cdata] = tensor.untyped_storage().nbytes()
        return tensor
    handles = []
    for unit in checkpoint_units(model):
        handles.append(unit.register_forward_pre_hook(lambda m, a, k=None, u=id(unit): current.__setitem__(0, u)))
        handles.append(unit.register_forward_hook(lambda m, a, o: current.__setitem__(0, None)))
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        model(**inputs)
    for h in handles:
        h.remove()
    return max((sum(v.values()) for v in per_unit.values()), default=0)


def adapter_bytes(model, family_name: str) -> tuple[int, int]:
    """(adapters, trainable values) of the family's recipe on its attention targets; bytes of fp32
    parameters, gradients and two AdamW states, plus frozen copies for the orthogonal variants."""
    from tlora_pack.tlora_core.config import VARIANTS
    from tlora_pack.tlora_core.families import family_named, find_sites

    family = family_named(family_name)
    recipe = family.recipe
    sites = find_sites(model, family.rules("attention"))
    values = sum(recipe.rank * (s.in_features + s.out_features + 1) for s in sites.values())
    ortho = VARIANTS[recipe.variant][0]
    return len(sites), values * 4 * (4 + (1 if ortho else 0))


def report(name: str, build, weight_bytes_per_param: float, weight_label: str, goal_gib: float,
           family_name: str, copy_saved: bool) -> list[str]:
    model, inputs, _ = build()
    params = sum(p.numel() for p in model.parameters())
    n_adapters, adapters = adapter_bytes(model, family_name)
    weights = params * weight_bytes_per_param
    lines = [f"{name}: {params / 1e9:.2f} B parameters ({weight_label}: {weights / GIB:.1f} GiB), "
             f"{n_adapters} adapters of the {family_name} recipe ({adapters / GIB:.2f} GiB with grads and AdamW)"]
    for checkpointing in (False, True):
        flops, kept, block = traced_step(model, inputs, checkpointing, copy_saved)
        total = weights + adapters + kept + block
        verdict = "fits" if total / GIB <= goal_gib else "does NOT fit"
        lines.append(f"  gradient checkpointing {'on ' if checkpointing else 'off'}: {flops / 1e12:.1f} TFLOP/step; "
                     f"kept for backward {kept / GIB:.1f} GiB" + (f" + largest block recomputed {block / GIB:.1f} GiB"
                                                                  if checkpointing else "")
                     + f"; total {total / GIB:.1f} GiB -> {verdict} in {goal_gib:g} GiB")
    return lines


def main():
    argparse.ArgumentParser(description=__doc__.split("\n")[0]).parse_args()
    from support import comfy_env
    print(f"torch {torch.__version__}; ComfyUI at {comfy_env.comfyui_dir()}")
    lines = report("FLUX.1-dev, 1024 px, batch 1", flux_dev_meta, 1.0, "fp8 base", 24, "Flux", True)
    lines += report("SD-XL, 1024 px, batch 1", sdxl_meta, 2.0, "bf16 base", 12, "SD-XL", False)
    lines.append("Left out: text encoders and VAE (run once; T5-XXL fp8 4.6 GiB, CLIP-L 0.2 GiB, OpenCLIP-bigG "
                 "1.3 GiB, VAEs 0.2 GiB), the CUDA context (~0.5-1 GiB), allocator slack and ComfyUI's per-layer "
                 "weight casts (one layer at a time).")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

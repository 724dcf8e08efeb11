"""GPU memory of one T-LoRA training step for every model family, counted on the meta device.

    python benchmarks/memory_estimate.py                  # every model below, and the presets they give
    python benchmarks/memory_estimate.py --only flux_dev,sdxl

No weights, no GPU: each diffusion model is built at full size on the meta device by the ComfyUI found at
$TLORA_COMFYUI_DIR (or .deps/ComfyUI), configured by the host's own detector from a few key shapes of a
real checkpoint (the UNets from their published configs), and one forward + backward is traced at the
family's recipe resolution. Activation memory is the bytes autograd keeps for backward (each storage
once), measured with saved-tensor hooks the way the trainer runs: without checkpointing every block's
activations, with it (trainer.train.checkpointed_blocks) the block inputs plus, during backward, the
largest single block's activations; both plus the working set, taken as that block's activations once
more (twice for a family whose saved tensors are copies). Attention is counted as CUDA's fused SDPA
kernels keep it (q, k, v, output, log-sum-exp; the meta device's own SDPA would keep the whole attention
matrix), and each adapted layer's input as its adapter saves it (the bare model traced here saves no
input of a frozen Linear). Weights count 2 bytes a value as loaded in bf16 / fp16, 1 as fp8 (ComfyUI
casts one layer at a time to the compute dtype). A weight autograd saves for backward costs nothing more
in bf16 (it is the loaded weight) and its cast copy, 2 bytes a value, with an fp8 base.
The T-LoRA is the family's recipe on its attention targets (tlora_core.families); its parameters,
gradients and the recipe's optimizer states are fp32.
Text encoders and the VAE run once before training and ComfyUI unloads them when the diffusion model
needs the room, so they are left out. A card of N GiB is counted as N - 1 GiB usable (CUDA context,
allocator slack).

The last table is what the Train node's `memory` presets hold (tlora_core/families.py, MEMORY_PRESETS):
for each card, the first setting in PREFERENCE that fits; each key there takes the row of the model it is
sized on (a family's largest, or a config class's own).
Goals (issue 19): FLUX.1-dev and Flux.2 Klein <= 16 GiB, SD-XL <= 8 GiB, Wan 2.2 5B <= 16 GiB.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
from dataclasses import dataclass, field
from pathlib import Path
from math import prod
from typing import Optional

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
import conftest  # noqa: E402,F401  (ComfyUI on the path, the pack as `tlora_pack`, CPU flags)

GIB = 2 ** 30
CARDS = (8, 12, 16, 24)
CARD_OVERHEAD_GIB = 1.0
# Settings tried on each card, best first: (fp8 base, gradient checkpointing, resolution; 0 = native).
PREFERENCE = ((False, False, 0), (False, True, 0), (True, True, 0), (True, True, 768), (True, True, 512))


@dataclass
class Subject:
    """One model at full size: how to build it on the meta device and what one training call gets."""

    key: str
    title: str
    family: str                 # tlora_core.families name whose recipe and targets apply
    detect: dict = field(default_factory=dict)   # checkpoint key -> shape, for the host's detector
    latent: tuple = (4, 8)       # latent channels, pixels per latent cell
    frames: bool = False         # latents carry a time axis (one frame)
    context: tuple = (77, 768)   # text tokens, width
    pooled: int = 0
    guidance: bool = False
    unet: Optional[dict] = None  # a UNet's whole config instead (the detector needs every key of one)
    # further forward inputs the family's model needs: name -> shape (bf16 zeros), ("ones", shape) for masks,
    # or a plain number passed as it is
    extra: dict = field(default_factory=dict)
    env: str = "0.3.75"          # the oldest host whose classes build it ("0.33.0": the class exists only there)
    build_on_cpu: bool = False   # built on the CPU (weights uninitialised) and then moved to the meta device


def _blocks(pattern: str, n: int, shape=(1, 1)) -> dict:
    return {pattern.format(i): shape for i in range(n)}


def _flux(hidden, double, single, context, flux2=False, vec=768, guidance=True) -> dict:
    keys = {"double_blocks.0.img_attn.norm.key_norm.scale": (128,), "txt_in.weight": (hidden, context),
            "img_in.weight": (hidden, 128 if flux2 else 64)}
    if flux2:
        keys["double_stream_modulation_img.lin.weight"] = (1, 1)
    if vec:
        keys["vector_in.in_layer.weight"] = (hidden, vec)
    if guidance:
        keys["guidance_in.in_layer.weight"] = (hidden, 256)
    return {**keys, **_blocks("double_blocks.{}.img_attn.qkv.weight", double),
            **_blocks("single_blocks.{}.linear1.weight", single)}


def _sd3(depth, attn2_layers=0, patches=192 * 192) -> dict:
    width = 64 * depth
    keys = {"joint_blocks.0.context_block.attn.qkv.weight": (3 * width, width),
            "x_embedder.proj.weight": (width, 16, 2, 2), "final_layer.linear.weight": (64, width), "y_embedder.mlp.0.weight": (width, 2048),
            "context_embedder.weight": (width, 4096), "pos_embed": (1, patches, width),
            "joint_blocks.0.context_block.attn.ln_q.weight": (64,)}
    keys.update(_blocks("joint_blocks.{}.x_block.attn2.qkv.weight", attn2_layers))
    return keys


def _wan(dim, layers, ffn, in_dim, out_dim) -> dict:
    return {"head.modulation": (1, 2, dim), "head.head.weight": (out_dim * 4, dim), "blocks.0.ffn.0.weight": (ffn, dim),
            "patch_embedding.weight": (dim, in_dim, 1, 2, 2), **_blocks("blocks.{}.self_attn.q.weight", layers)}


def _hunyuan(hidden, double, single, context, patch, in_ch, out_ch, vec=True, guidance=False, byt5=False,
             vision=0) -> dict:
    """HunyuanVideo's detector keys: patch (t, h, w) or (h, w) from img_in, widths, block counts, optional parts."""
    keys = {"txt_in.individual_token_refiner.blocks.0.norm1.weight": (hidden,),
            "img_in.proj.weight": (hidden, in_ch, *patch), "final_layer.linear.weight": (out_ch * prod(patch), hidden),
            "txt_in.input_embedder.weight": (hidden, context),
            **_blocks("double_blocks.{}.img_attn.qkv.weight", double), **_blocks("single_blocks.{}.linear1.weight", single)}
    if vec:
        keys["vector_in.in_layer.weight"] = (hidden, 768)
    if guidance:
        keys["guidance_in.in_layer.weight"] = (hidden, 256)
    if byt5:
        keys["byt5_in.fc1.weight"] = (2048, 1472)
    if vision:
        keys["cond_type_embedding.weight"] = (3, hidden)
        keys["vision_in.proj.0.weight"] = (vision, vision)
    return keys


def _kandinsky5(model_dim, ff_dim, time_dim, text_blocks, visual_blocks, visual_embed, text=3584, pooled=768) -> dict:
    return {"visual_transformer_blocks.0.cross_attention.key_norm.weight": (128,),
            "visual_embeddings.in_layer.bias": (model_dim,), "visual_embeddings.in_layer.weight": (model_dim, visual_embed),
            "time_embeddings.in_layer.bias": (time_dim,), "visual_transformer_blocks.0.feed_forward.in_layer.weight": (ff_dim, model_dim),
            "text_embeddings.in_layer.weight": (model_dim, text), "pooled_text_embeddings.in_layer.weight": (time_dim, pooled),
            **_blocks("text_transformer_blocks.{}.self_attention.to_query.weight", text_blocks),
            **_blocks("visual_transformer_blocks.{}.self_attention.to_query.weight", visual_blocks)}


_UNET = dict(image_size=32, in_channels=4, out_channels=4, model_channels=320, use_spatial_transformer=True,
             legacy=False, use_checkpoint=False, use_temporal_attention=False, use_temporal_resblock=False)
SD15_UNET = dict(_UNET, num_res_blocks=[2, 2, 2, 2], channel_mult=[1, 2, 4, 4],
                 transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], transformer_depth_middle=1, transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
                 use_linear_in_transformer=False, context_dim=768, num_heads=8)
SD21_UNET = dict(SD15_UNET, use_linear_in_transformer=True, context_dim=1024, num_heads=-1, num_head_channels=64)
from train_step import SDXL_UNET  # noqa: E402  (benchmarks/ is on sys.path when this file runs)

SUBJECTS = (
    Subject("sd15", "SD 1.5", "SD1.x", unet=SD15_UNET),
    Subject("sd21", "SD 2.1 (768-v)", "SD2.x", unet=SD21_UNET, context=(77, 1024)),
    Subject("sdxl", "SD-XL", "SD-XL", unet=SDXL_UNET, context=(77, 2048), pooled=2816),
    Subject("flux_dev", "FLUX.1-dev", "Flux", _flux(3072, 19, 38, 4096), (16, 8), context=(512, 4096), pooled=768,
            guidance=True),
    Subject("klein_4b", "Flux.2 Klein 4B", "Flux2", _flux(3072, 5, 20, 7680, flux2=True, vec=0, guidance=False),
            (128, 16), context=(512, 7680)),
    Subject("klein_9b", "Flux.2 Klein 9B", "Flux2", _flux(4096, 8, 24, 12288, flux2=True, vec=0, guidance=False),
            (128, 16), context=(512, 12288)),
    Subject("flux2_dev", "Flux.2 dev (32B)", "Flux2", _flux(6144, 8, 48, 15360, flux2=True, vec=0), (128, 16),
            context=(512, 15360), guidance=True),
    Subject("sd35_medium", "SD3.5 Medium", "SD3", _sd3(24, 13, 384 * 384), (16, 8), context=(154, 4096), pooled=2048),
    Subject("sd35_large", "SD3.5 Large", "SD3", _sd3(38), (16, 8), context=(154, 4096), pooled=2048),
    Subject("lumina2", "Lumina 2", "Lumina2", {"cap_embedder.1.weight": (2304, 2304),
                                              **_blocks("layers.{}.attention.qkv.weight", 26),
                                              "noise_refiner.0.attention.k_norm.weight": (1,)},
            (16, 8), context=(256, 2304)),
    Subject("zimage", "Z-Image", "Lumina2", {"cap_embedder.1.weight": (3840, 2560), "cap_pad_token": (1, 3840),
                                            **_blocks("layers.{}.attention.qkv.weight", 30),
                                            "noise_refiner.0.attention.k_norm.weight": (1,)},
            (16, 8), context=(256, 2560)),
    Subject("qwen_image", "Qwen-Image", "QwenImage", {"txt_norm.weight": (3584,), "img_in.weight": (3072, 64),
                                                      **_blocks("transformer_blocks.{}.attn.to_q.weight", 60)},
            (16, 8), frames=True, context=(256, 3584)),
    Subject("wan22_5b", "Wan 2.2 5B (TI2V), one frame", "Wan", _wan(3072, 30, 14336, 48, 48), (48, 16), frames=True,
            context=(512, 4096)),
    Subject("wan22_14b", "Wan 2.2 14B (T2V, one expert), one frame", "Wan", _wan(5120, 40, 13824, 16, 16), (16, 8),
            frames=True, context=(512, 4096)),
    # ---- the families of the generic rule (issue 19 item 5). Sizes from the published configs named beside each.
    # HunyuanVideo 1.0 (13 B): diffusers HunyuanVideoTransformer3DModel defaults = hunyuanvideo-community/HunyuanVideo:
    # 24 heads x 128 = 3072, 20 double + 40 single blocks, patch 1x2x2, 16 latent channels, LLaVA-Llama-3 text 4096,
    # CLIP-L pooled 768, guidance embedding (the CFG-distilled release).
    Subject("hunyuan_video", "HunyuanVideo 13B, one frame", "HunyuanVideo",
            _hunyuan(3072, 20, 40, 4096, (1, 2, 2), 16, 16, guidance=True), (16, 8), frames=True, context=(256, 4096),
            pooled=768, guidance=True),
    # HunyuanImage 2.1 (17 B): Tencent-Hunyuan/HunyuanImage-2.1 hunyuanimage_v2_1_cfg: hidden 3584 (28 heads), 20 double +
    # 40 single blocks, patch 1x1 on the 64-channel latent of its 32x VAE, Qwen2.5-VL text 3584, glyph ByT5 on, no
    # guidance embedding (the base model).
    Subject("hunyuan_image21", "HunyuanImage 2.1 17B", "HunyuanVideo",
            _hunyuan(3584, 20, 40, 3584, (1, 1), 64, 64, vec=False, byt5=True), (64, 32), context=(256, 3584)),
    # HunyuanVideo 1.5 (8.3 B): diffusers HunyuanVideo15Transformer3DModel defaults: 16 heads x 128 = 2048, 54 double
    # blocks, no single, patch 1x1x1, in 65 (32 latent + 32 image condition + 1 mask) and out 32 channels of its 16x VAE,
    # Qwen2.5-VL text 3584, ByT5 1472, SigLIP image 1152.
    Subject("hunyuan_video15", "HunyuanVideo 1.5 8.3B, one frame", "HunyuanVideo",
            _hunyuan(2048, 54, 0, 3584, (1, 1, 1), 65, 32, vec=False, byt5=True, vision=1152), (65, 16), frames=True,
            context=(256, 3584)),
    # Kandinsky 5.0 Video Pro (19 B), ComfyUI 0.33.0 only: model_dim 4096 (the width 0.33.0's detector takes for
    # Pro video), ff 16384, time 1024, 4 text + 60 visual blocks as the Kandinsky Pro configs give them (builds
    # 19.31 B, the published 19 B); visual input 33 channels (latent 16 + condition 16 + mask) in 1x2x2 patches =
    # 132; HunyuanVideo's 16-channel VAE; Qwen2.5-VL text 3584, CLIP-L pooled 768.
    Subject("kandinsky5_pro", "Kandinsky 5.0 Video Pro 19B, one frame", "Kandinsky5",
            _kandinsky5(4096, 16384, 1024, 4, 60, 132), (33, 8), frames=True, context=(256, 3584), pooled=768,
            env="0.33.0"),
    # AuraFlow v0.3 (6.8 B): fal/AuraFlow transformer/config.json: 4 MMDiT + 32 single layers, 12 heads x 256 = 3072,
    # joint_attention_dim 2048 (Pile-T5), pos_embed_max_size 4096, SD-XL's 4-channel VAE.
    Subject("auraflow", "AuraFlow 0.3", "AuraFlow",
            {"double_layers.0.attn.w1q.weight": (3072, 3072), "positional_encoding": (1, 4096, 3072),
             "cond_seq_linear.weight": (3072, 2048), **_blocks("double_layers.{}.attn.w1q.weight", 4),
             **_blocks("single_layers.{}.attn.w1q.weight", 32)}, (4, 8), context=(256, 2048)),
    # PixArt-Sigma XL-2 1024-MS (0.6 B; PixArt-alpha/PixArt-Sigma-XL-2-1024-MS): 28 blocks of 1152 (the detector's fixed width and heads), T5 of 300 tokens,
    # 128 x 128 latent positions (pe interpolation 2), SD-XL's 4-channel VAE.
    Subject("pixart_sigma", "PixArt-Sigma XL 1024", "PixArt",
            {"t_block.1.weight": (6 * 1152, 1152), "y_embedder.y_embedding": (300, 4096), "pos_embed": (1, 4096, 1152),
             **_blocks("blocks.{}.attn.qkv.weight", 28)}, (4, 8), context=(300, 4096), build_on_cpu=True),
    # LongCat-Image (6 B), ComfyUI 0.33.0 only: Flux blocks, 24 heads x 128 = 3072, 10 double + 20 single blocks,
    # Qwen2.5-VL text 3584, no pooled vector and no guidance input (meituan-longcat/LongCat-Image).
    Subject("longcat_image", "LongCat-Image 6B", "LongCat-Image", _flux(3072, 10, 20, 3584, vec=0, guidance=False),
            (16, 8), context=(256, 3584), env="0.33.0"),
    # OmniGen2 (4 B): the detector fixes the OmniGen2 config (hidden 2520, 21 heads / 7 kv heads, 32 layers + 2
    # refiners, Qwen2.5-VL-3B text 2048), as OmniGen2's transformer/config.json has it.
    Subject("omnigen2", "OmniGen2", "Omnigen2", {"time_caption_embed.timestep_embedder.linear_1.bias": (1024,)}, (16, 8),
            context=(256, 2048), extra={"num_tokens": 256}),
    # Not here: HiDream-I1 (17 B). Its MoE feed-forward sends each token to the experts its gate picks, by boolean
    # indexing on the gate's values, which the meta device cannot trace (torch.nonzero has no data-free shape);
    # assuming every token at every expert would count the routed experts' activations four times over.
    # Mochi 1 preview (10 B): the detector fixes Mochi's config (48 blocks, 24 heads, visual width 3072, text 1536,
    # 12 latent channels of an 8x spatial VAE, T5-XXL 256 tokens).
    Subject("mochi", "Mochi 1 preview 10B, one frame", "GenmoMochi", {"t5_yproj.weight": (1536, 4096)}, (12, 8),
            frames=True, context=(256, 4096), extra={"attention_mask": ("ones", (1, 256)), "num_tokens": 256}),
    # LTX-Video 13B (0.9.7 / 0.9.8): Lightricks/LTX-Video-0.9.7-dev transformer/config.json: 48 layers, 32 heads x 128
    # = 4096, cross_attention_dim 4096, 128 latent channels of a 32x spatial VAE, patch 1.
    Subject("ltxv_13b", "LTX-Video 13B, one frame", "LTXV",
            {"adaln_single.emb.timestep_embedder.linear_1.bias": (4096,), "transformer_blocks.0.attn2.to_k.weight": (4096, 4096),
             **_blocks("transformer_blocks.{}.attn1.to_q.weight", 48)}, (128, 32), frames=True, context=(128, 4096),
            extra={"attention_mask": ("ones", (1, 128))}),
    # Hunyuan-DiT v1.2 (1.5 B): DiT-g/2, 40 blocks of 1408 (Tencent-Hunyuan/HunyuanDiT); CLIP (Chinese) 77 x 1024,
    # mT5-XL 256 x 2048, SD-XL's 4-channel VAE.
    Subject("hunyuan_dit", "Hunyuan-DiT 1.2", "HunyuanDiT",
            {"mlp_t5.0.weight": (8192, 2048), "x_embedder.proj.weight": (1408, 4, 2, 2),
             "extra_embedder.0.weight": (5632, 1280), **_blocks("blocks.{}.attn1.Wqkv.weight", 40)}, (4, 8),
            context=(77, 1024), extra={"text_embedding_mask": ("ones", (1, 77)), "encoder_hidden_states_t5": (1, 256, 2048),
                                       "text_embedding_mask_t5": ("ones", (1, 256)), "image_meta_size": (1, 6)}),
    # CogVideoX 5B, ComfyUI 0.33.0 only: THUDM/CogVideoX-5b transformer/config.json: 42 layers, 48 heads x 64 = 3072,
    # time embedding 512, 16 latent channels of an 8x spatial VAE in 2x2 patches, rotary positions (no learned
    # table), T5-XXL text 226 x 4096. The detector reads both widths from block 0's norm: its shape comes after the
    # block list, whose placeholder shapes would replace it.
    Subject("cogvideox_5b", "CogVideoX 5B, one frame", "CogVideoX",
            {**_blocks("blocks.{}.norm1.linear.weight", 42), "blocks.0.norm1.linear.weight": (6 * 3072, 512),
             "patch_embed.proj.weight": (3072, 16, 2, 2), "patch_embed.text_proj.weight": (3072, 4096)}, (16, 8),
            frames=True, context=(226, 4096), env="0.33.0"),
    # Cosmos 1 Text2World 7B and 14B: the detector fixes nvidia/Cosmos-1.0-Diffusion-{7B,14B}-Text2World's configs
    # from the width (4096: 28 blocks, 32 heads; 5120: 36 blocks, 40 heads) and reads the latent channels from the
    # patch embedding (16 + the padding mask channel, 2x2 patches); 8x spatial tokenizer; T5-XXL text 512 x 1024.
    Subject("cosmos1_7b", "Cosmos 1 Text2World 7B, one frame", "Cosmos",
            {"blocks.block0.blocks.0.block.attn.to_q.0.weight": (4096, 4096), "x_embedder.proj.1.weight": (4096, 68)},
            (16, 8), frames=True, context=(512, 1024)),
    Subject("cosmos1_14b", "Cosmos 1 Text2World 14B, one frame", "Cosmos",
            {"blocks.block0.blocks.0.block.attn.to_q.0.weight": (5120, 5120), "x_embedder.proj.1.weight": (5120, 68)},
            (16, 8), frames=True, context=(512, 1024)),
    # Cosmos Predict2 Text2Image 2B and 14B: nvidia/Cosmos-Predict2-{2B,14B}-Text2Image: 28 blocks of 2048 (16 heads),
    # 36 of 5120 (40 heads); Wan 2.1's 16-channel 8x VAE, T5-XXL text 512 x 1024.
    Subject("cosmos_predict2_2b", "Cosmos Predict2 2B Text2Image", "Cosmos",
            {"x_embedder.proj.1.weight": (2048, 68), **_blocks("blocks.{}.mlp.layer1.weight", 28)}, (16, 8), frames=True,
            context=(512, 1024)),
    Subject("cosmos_predict2_14b", "Cosmos Predict2 14B Text2Image", "Cosmos",
            {"x_embedder.proj.1.weight": (5120, 68), **_blocks("blocks.{}.mlp.layer1.weight", 36)}, (16, 8), frames=True,
            context=(512, 1024)),
    # Stable Cascade stage C (3.6 B): stabilityai/stable-cascade prior/config.json: two levels of 2048 channels, 32
    # heads, 8 + 24 blocks down and 24 + 8 up; the detector reads the text mapper's width (2048: the full, not the
    # lite, stage C). Its 16-channel latent is 1/42 of the image side (24 x 24 at 1024 px, as ComfyUI's
    # StableCascade_EmptyLatentImage makes it); CLIP-G text 77 x 1280 and pooled 1280, and the image embedding's
    # zeros (1 x 768) that ComfyUI passes without an unCLIP image.
    Subject("stable_cascade_c", "Stable Cascade stage C", "StableCascade",
            {"clf.1.weight": (16, 2048, 1, 1), "clip_txt_mapper.weight": (2048, 1280)}, (16, 42), context=(77, 1280),
            extra={"clip_text": (1, 77, 1280), "clip_text_pooled": (1, 1, 1280), "clip_img": (1, 1, 768)}),
)


def _family_of(model_config) -> str:
    from tlora_pack.tlora_core.families import family_for
    family = family_for([c.__name__ for c in type(model_config).__mro__])
    return family.name if family is not None else type(model_config).__name__


class HostLacksModel(LookupError):
    """The host's detector has no config class for a subject (a newer ComfyUI has it)."""


def build(subject: Subject, resolution: int):
    """(diffusion model on the meta device, bf16, its forward's keyword arguments for one image)."""
    import comfy.model_detection
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    bf16 = torch.bfloat16
    with torch.device("meta"):
        if subject.unet is not None:
            model = UNetModel(**subject.unet, dtype=bf16, operations=comfy.ops.disable_weight_init)
        else:
            sd = {k: torch.empty(s) for k, s in subject.detect.items()}
            config = comfy.model_detection.detect_unet_config(sd, "")
            model_config = comfy.model_detection.model_config_from_unet_config(config, sd) if config else None
            if model_config is None or _family_of(model_config) != subject.family:
                raise HostLacksModel(f"{subject.title}: this host's detector has no {subject.family} class for it (the "
                                     f"class is on ComfyUI {subject.env}); skipped")
            if config.get("image_model") == "flux2":  # heads of 128 (0.3.75's detector fixes 48, Flux.2 dev's)
                config["num_heads"] = config["hidden_size"] // sum(config["axes_dim"])
                model_config = comfy.model_detection.model_config_from_unet_config(config, sd)
            model_config.set_inference_dtype(bf16, None)
            if subject.build_on_cpu:  # its constructor reads values (.item()), which the meta device has not
                with torch.device("cpu"):
                    model = model_config.get_model({}, "", device=torch.device("cpu")).diffusion_model.to("meta")
            else:
                model = model_config.get_model({}, "", device=torch.device("meta")).diffusion_model
    return model, step_inputs(subject, model, resolution, bf16)


def step_inputs(subject: Subject, model, resolution: int, dtype: torch.dtype) -> dict:
    """The diffusion model's forward keyword arguments for one image of `subject` (meta tensors)."""
    side = resolution // subject.latent[1]
    shape = (1, subject.latent[0], 1, side, side) if subject.frames else (1, subject.latent[0], side, side)
    with torch.device("meta"):
        inputs = dict(x=torch.zeros(shape, dtype=dtype, requires_grad=True), timesteps=torch.zeros(1),
                      context=torch.zeros(1, *subject.context, dtype=dtype))
        if subject.pooled:
            inputs["y"] = torch.zeros(1, subject.pooled, dtype=dtype)
        if subject.guidance:
            inputs["guidance"] = torch.ones(1)
        if subject.family == "Lumina2":
            inputs["num_tokens"] = subject.context[0]
        for name, spec in subject.extra.items():
            inputs[name] = _extra_input(spec, dtype)
    names = _argument_names(model)
    if subject.unet is None and "timesteps" not in names:
        # Stable Cascade's stage C calls it r (its context goes in as clip_text, `context` to **kwargs as ComfyUI's does)
        inputs["timestep" if "timestep" in names else "r" if "r" in names else "t"] = inputs.pop("timesteps")
    return inputs


def _extra_input(spec, dtype: torch.dtype):
    if isinstance(spec, (int, float)):
        return spec
    if spec[0] == "ones":
        return torch.ones(spec[1], dtype=dtype)
    return torch.zeros(spec, dtype=dtype)


def _argument_names(model) -> tuple:
    import inspect
    return tuple(inspect.signature(model.forward).parameters)


def traced_step(model, inputs, checkpointing: bool, copy_saved: bool, family_name: str) -> dict:
    """Bytes kept for backward by one forward (plus the largest block's, recomputed in backward), as
    {"activations": ..., "weights": ..., "working": ...}. "working" is the step's working set beyond what is
    kept, counted as the largest block's saved activations once more (the gradients flowing through a block
    are about the size of what it saved), twice with copy_saved (a block's tensors then live beside their
    copies until it ends); benchmarks/README.md compares this with the allocator's peak on the CPU. "weights"
    is what autograd saves of the model's own weights, which costs nothing more for a base held in the
    compute dtype (the saved tensor is the weight) and a cast copy per layer for an fp8 base. copy_saved:
    autograd keeps copies of the other saved tensors, as the trainer does for a family whose blocks add in
    place (Family.inplace_residuals, trainer.loop.SavedCopies). Runs under the trainer's frozen_base, which
    raises ComfyUI's `in_training` (0.33.0 then uses its autograd-capable RoPE instead of comfy_kitchen's
    kernel), with attention as CUDA's fused kernels keep it (fused_attention) and the inputs the family's
    adapters save (adapter_inputs)."""
    from tlora_pack.trainer.train import checkpointed_blocks, frozen_base

    model.requires_grad_(False)
    kept = _SavedBytes(model, copy_saved)
    with frozen_base(model), fused_attention():
        with checkpointed_blocks(model, checkpointing, copy_saved):
            with torch.autograd.graph.saved_tensors_hooks(kept.keep, lambda tensor: tensor), \
                    adapter_inputs(model, family_name, kept.keep):
                out = model(**inputs)
            total = kept.bytes()
            out.float().sum().backward()
        # with the blocks' own forwards back: under checkpointed_blocks a block saves only its inputs
        block = _largest_block(model, inputs, copy_saved, family_name)
        if checkpointing:
            total = {k: total[k] + block[k] for k in total}
    # with copies, a block's originals are alive beside the copies until it ends: twice the working set
    return {**total, "working": block["activations"] * (2 if copy_saved else 1)}


@contextlib.contextmanager
def adapter_inputs(model, family_name: str, keep):
    """Hands `keep` the input of each layer the family's recipe adapts, once per forward of the layer (the
    slices of a fused weight share it): what the trainer's adapter saves for its A's gradient, while the bare
    model traced here saves no input of a frozen Linear. Not in a forward without grad (a checkpointed
    block's first pass saves nothing)."""
    from tlora_pack.tlora_core.families import family_named
    paths = {site.module_path.removeprefix("diffusion_model.")
             for site in family_named(family_name).sites(model, "attention").values()}
    held = []  # keeps each kept input (or its copy) alive: a freed storage's identity could be reused

    def save_input(module, args):
        if torch.is_grad_enabled() and args and torch.is_tensor(args[0]):
            held.append(keep(args[0]))
    handles = [model.get_submodule(path).register_forward_pre_hook(save_input) for path in sorted(paths)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class _FusedAttention(torch.autograd.Function):
    """Attention as CUDA's fused SDPA kernels (flash, memory-efficient: what ComfyUI's pytorch attention runs on
    an NVIDIA card) keep it for backward: q, k, v, the output, one fp32 log-sum-exp per query row and the mask.
    The meta device's own SDPA takes the math path, which keeps the whole attention matrix twice (scores and
    probabilities: 2 x 24 x 4608 x 4608 bf16 = 1.9 GiB per FLUX block at 1024 px) and is not what trains."""

    @staticmethod
    def forward(ctx, q, k, v, mask):
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        log_sum_exp = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
        ctx.save_for_backward(q, k, v, out, log_sum_exp, *([mask] if torch.is_tensor(mask) else []))
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v = ctx.saved_tensors[:3]
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), None


@contextlib.contextmanager
def fused_attention():
    """torch's SDPA (which comfy.ops and ComfyUI's pytorch attention call by attribute) as _FusedAttention."""
    real = torch.nn.functional.scaled_dot_product_attention

    def sdpa(q, k, v, attn_mask=None, *args, **kwargs):
        return _FusedAttention.apply(q, k, v, attn_mask)
    torch.nn.functional.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = real


class _SavedBytes:
    """A saved-tensor pack hook that records each storage autograd keeps once, split into the model's own
    weights and everything else."""

    def __init__(self, model, copy_saved: bool):
        from tlora_pack.trainer.loop import SavedCopies, frozen_storages
        self.frozen, self.storages = frozen_storages(model), {}
        self.copies = SavedCopies(self.frozen) if copy_saved else None

    def keep(self, tensor, where=None):
        tensor = self.copies.pack(tensor) if self.copies is not None else tensor
        storage = tensor.untyped_storage()
        kind = "weights" if storage._cdata in self.frozen else "activations"
        self.storages.setdefault(where, {})[storage._cdata] = (kind, storage.nbytes())
        return tensor

    def bytes(self, where=None) -> dict:
        total = {"activations": 0, "weights": 0}
        for kind, n in self.storages.get(where, {}).values():
            total[kind] += n
        return total


def _largest_block(model, inputs, copy_saved: bool, family_name: str) -> dict:
    """Bytes a single block keeps for backward (as traced_step), of the block that keeps the most, recorded per
    block in one plain forward."""
    from tlora_pack.trainer.train import checkpoint_units

    kept = _SavedBytes(model, copy_saved)
    current = [None]
    handles = []
    for unit in checkpoint_units(model):
        handles.append(unit.register_forward_pre_hook(lambda m, a, u=id(unit): current.__setitem__(0, u)))
        handles.append(unit.register_forward_hook(lambda m, a, o: current.__setitem__(0, None)))

    def keep(tensor):
        return kept.keep(tensor, current[0])
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor), \
            adapter_inputs(model, family_name, keep):
        model(**inputs)
    for h in handles:
        h.remove()
    blocks = [kept.bytes(u) for u in kept.storages if u is not None]
    return max(blocks, key=lambda b: sum(b.values()), default={"activations": 0, "weights": 0})


# fp32 tensors per trained value besides the value itself and its gradient: AdamW's two moments; Prodigy's
# two moments, its running sum s and its starting point p0
OPTIMIZER_STATES = {"adamw": 2, "prodigy": 4}


def adapter_bytes(model, family_name: str) -> tuple[int, int, str]:
    """(adapters, bytes of fp32 parameters + gradients + the recipe's optimiser states, and frozen copies for
    the orthogonal variants, note) of the family's recipe on its attention targets."""
    from tlora_pack.tlora_core.config import VARIANTS
    from tlora_pack.tlora_core.families import family_named

    family = family_named(family_name)
    recipe = family.recipe
    sites = family.sites(model, "attention")
    values = sum(recipe.rank * (s.in_features + s.out_features + 1) for s in sites.values())
    ortho = VARIANTS[recipe.variant][0]
    per_value = 2 + OPTIMIZER_STATES[recipe.optimizer] + (1 if ortho else 0)
    return len(sites), values * 4 * per_value, f" ({recipe.optimizer})"


def native_resolution(family_name: str) -> int:
    from tlora_pack.tlora_core.families import family_named
    family = family_named(family_name)
    return family.recipe.resolution if family is not None else 1024


def measure(subject: Subject) -> dict:
    """{(fp8, checkpointing, resolution): GiB} for every setting of PREFERENCE and both bases without
    checkpointing, with the model's size; printed as it goes."""
    native = native_resolution(subject.family)
    from tlora_pack.tlora_core.families import family_named
    copy_saved = family_named(subject.family).inplace_residuals  # the trainer's choice (Flux blocks add in place)
    traces: dict = {}
    result: dict = {}
    for fp8, checkpointing, px in PREFERENCE + ((True, False, 0),):
        px = px or native
        if px > native:
            continue
        if (checkpointing, px) not in traces:
            model, inputs = build(subject, px)
            traces[(checkpointing, px)] = traced_step(model, inputs, checkpointing, copy_saved, subject.family)
        params = sum(p.numel() for p in model.parameters())
        n_adapters, adapters, note = adapter_bytes(model, subject.family)
        saved = traces[(checkpointing, px)]
        result[(fp8, checkpointing, px)] = (params * (1 if fp8 else 2) + adapters + saved["activations"]
                                            + (saved["weights"] if fp8 else 0) + saved["working"]) / GIB
    result["info"] = f"{params / 1e9:.2f} B parameters, {n_adapters} adapters ({adapters / GIB:.2f} GiB){note}"
    result["native"] = native
    return result


def fits(gib: float, card: int) -> bool:
    return gib <= card - CARD_OVERHEAD_GIB


def preset_for(result: dict, card: int):
    """The first setting of PREFERENCE that fits on the card, as (fp8, checkpointing, px), or None."""
    native = result["native"]
    for fp8, checkpointing, px in PREFERENCE:
        key = (fp8, checkpointing, px or native)
        if key in result and fits(result[key], card):
            return key
    return None


def describe(setting, native: int) -> str:
    if setting is None:
        return "does not fit"
    fp8, checkpointing, px = setting
    parts = (["fp8 base"] if fp8 else []) + (["checkpointing"] if checkpointing else [])
    parts += [f"{px} px"] if px != native else []
    return ", ".join(parts) or "as loaded"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", default="",
                        help="comma-separated subject keys: " + ", ".join(s.key for s in SUBJECTS))
    cli = parser.parse_args()
    from support import comfy_env
    print(f"torch {torch.__version__}; ComfyUI at {comfy_env.comfyui_dir()}")
    chosen = [s for s in SUBJECTS if not cli.only or s.key in cli.only.split(",")]
    rows, presets = [], []
    for subject in chosen:
        try:
            r = measure(subject)
        except HostLacksModel as e:
            print(e)
            continue
        n = r["native"]
        print(f"{subject.title} [{subject.family}], {n} px: {r['info']}")
        rows.append(f"| {subject.title} | {n} | {r[(False, False, n)]:.1f} | {r[(True, False, n)]:.1f} | "
                    f"{r[(False, True, n)]:.1f} | {r[(True, True, n)]:.1f} | "
                    + " | ".join(f"{r[k]:.1f}" if (k := (True, True, px)) in r else "-" for px in (768, 512)) + " |")
        presets.append(f"| {subject.title} | " + " | ".join(describe(preset_for(r, c), n) for c in CARDS) + " |")
    print("\nPeak GiB of one training step (bf16 / fp8 base; checkpointing off / on; then fp8 + checkpointing "
          "at 768 and 512 px)")
    print("| model | px | bf16 | fp8 | bf16 + ckpt | fp8 + ckpt | fp8 + ckpt 768 px | fp8 + ckpt 512 px |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    print(f"\nWhat fits on your card ({CARD_OVERHEAD_GIB:g} GiB of each card left for the CUDA context and slack)")
    print("| model | " + " | ".join(f"{c} GB" for c in CARDS) + " |")
    print("|---|" + "---|" * len(CARDS))
    print("\n".join(presets))


if __name__ == "__main__":
    main()

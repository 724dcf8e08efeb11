"""Tiny random models of every generative class of the host's `comfy.supported_models` that can be built tiny.

Each class is built by ComfyUI itself: its detector reads a few shaped (meta) tensors named as in a real
checkpoint of that architecture, the class's own `unet_config` (its detection keys: model type, input
channels, ...) goes on top, then only sizes shrink (width, heads, depth). The classes the earlier tiny
DiTs cover (support.tiny_families) reuse those. `NOT_TINY` lists every other class of ComfyUI 0.33.0's
file, with why it is not built here.
"""
from __future__ import annotations

import importlib
import inspect
import re
from dataclasses import replace

import torch

from support import tiny_families as tf
from support.tiny_families import TinyFamily

H = 256  # hidden width of the DiTs whose detector fixes the head dim at 128 (rope axes): 2 heads

_FLUX_KEYS = {"double_blocks.0.img_attn.norm.key_norm.scale": (128,), "single_blocks.0.linear1.weight": (1, 1)}
_HUNYUAN_KEYS = {"txt_in.individual_token_refiner.blocks.0.norm1.weight": (H,), "txt_in.input_embedder.weight": (H, 64),
                 "double_blocks.0.img_attn.norm.key_norm.weight": (1,), "single_blocks.0.linear1.weight": (1, 1)}
_WAN_KEYS = {"head.modulation": (1, 2, H), "head.head.weight": (16 * 4, H), "blocks.0.ffn.0.weight": (64, H),
             "patch_embedding.weight": (H, 16, 1, 2, 2)}

# Architectures (by the classes' image_model or family) the earlier tiny DiTs do not cover.
ARCHS = {
    "flux2": TinyFamily("flux2", {**_FLUX_KEYS, "double_stream_modulation_img.lin.weight": (1, 1),
                                  "img_in.weight": (H, 128), "txt_in.weight": (H, 64),
                                  "guidance_in.in_layer.weight": (H, 256)},
                        {"num_heads": 2}, context=64, extra_cond={"guidance": 3.5},
                        pooled=32),  # Flux.2 reads no pooled text; 0.3.75's Flux conditioning requires one
    "longcat": TinyFamily("longcat", {**_FLUX_KEYS, "img_in.weight": (H, 64), "txt_in.weight": (H, 3584)},
                          {}, context=3584),
    "hunyuan_video": TinyFamily("hunyuan_video", {**_HUNYUAN_KEYS, "img_in.proj.weight": (H, 16, 1, 2, 2),
                                                  "final_layer.linear.weight": (16 * 4, H),
                                                  "vector_in.in_layer.weight": (H, 768)},
                                {}, context=64, pooled=768),
    "wan": TinyFamily("wan", _WAN_KEYS, {}, context=4096),
    "kandinsky5": TinyFamily("kandinsky5", {
        "visual_transformer_blocks.0.cross_attention.key_norm.weight": (1,), "visual_embeddings.in_layer.bias": (H,),
        "visual_embeddings.in_layer.weight": (H, 132), "time_embeddings.in_layer.bias": (64,),
        "visual_transformer_blocks.0.feed_forward.in_layer.weight": (128, H),
        "text_transformer_blocks.0.x.weight": (1,)},
        {"model_dim": H, "ff_dim": 128, "time_dim": 64, "axes_dims": (16, 24, 24)}, context=3584, pooled=768),
    "aura": TinyFamily("aura", {"double_layers.0.attn.w1q.weight": (1, 1), "positional_encoding": (1, 1024, 128),
                                "cond_seq_linear.weight": (128, 2048), "single_layers.0.x.weight": (1,)},
                       {"dim": 128, "n_heads": 2, "global_conddim": 128}, context=2048),
    "pixart": TinyFamily("pixart", {"t_block.1.weight": (1, 1), "pos_embed": (1, 256, 128),
                                    "blocks.0.x.weight": (1,)},
                         {"hidden_size": 192, "num_heads": 2, "caption_channels": 64, "pe_interpolation": 1.0}, context=64),
    "omnigen2": TinyFamily("omnigen2", {"time_caption_embed.timestep_embedder.linear_1.bias": (1,)},
                           {"hidden_size": 120, "num_attention_heads": 3, "num_kv_heads": 1, "axes_dim_rope": [8, 16, 16],
                            "axes_lens": [300, 64, 64], "num_layers": 1, "num_refiner_layers": 1, "text_feat_dim": 64,
                            "multiple_of": 32}, context=64, extra_cond={"attention_mask": torch.ones(1, 8, dtype=torch.long)}),
    "hidream": TinyFamily("hidream", {"caption_projection.0.linear.weight": (1, 1)},
                          {"num_layers": 1, "num_single_layers": 1, "num_attention_heads": 2, "caption_channels": [64, 64],
                           "text_emb_dim": 32, "llama_layers": [0, 1], "num_routed_experts": 2},
                          context=64, pooled=32,
                          extra_cond={"conditioning_llama3": torch.randn(1, 2, 8, 64,
                                                                        generator=torch.Generator().manual_seed(7))}),
    "chroma": TinyFamily("chroma", {**_FLUX_KEYS, "distilled_guidance_layer.norms.0.scale": (1,),
                                    "txt_in.weight": (H, 64)},
                         {"out_dim": H, "hidden_dim": 64, "n_layers": 1, "num_heads": 2}, context=64,
                         pooled=32),  # Chroma reads no pooled text; 0.3.75's Flux conditioning requires one
    "chroma_radiance": TinyFamily("chroma_radiance", {**_FLUX_KEYS, "distilled_guidance_layer.norms.0.scale": (1,),
                                                      "txt_in.weight": (H, 64), "nerf_blocks.0.norm.scale": (1,),
                                                      "img_in_patch.weight": (H, 3, 16, 16)},
                                  {"out_dim": H, "hidden_dim": 64, "n_layers": 1, "num_heads": 2, "nerf_depth": 1,
                                   "nerf_hidden_size": 32}, context=64, pooled=32, downscale=1,  # pixel space
                                  ones=("norm.scale", "norm.weight")),  # RMS-norm scales (0.3.75: scale)
    # Mochi: depth 2, as the last block does not update the text; its blocks assert an MLP of 1536 * 8 (12288) wide
    "mochi": TinyFamily("mochi", {"t5_yproj.weight": (1, 1)},
                        {"depth": 2, "num_heads": 2, "hidden_size_x": H, "hidden_size_y": 128, "t5_feat_dim": 64,
                         "mlp_ratio_x": 12288 / H},
                        context=64, extra_cond={"attention_mask": torch.ones(1, 8, dtype=torch.long)}),
    # LTX-Video: its detector reads 32 heads from attn2's width; its text is projected to the model width
    "ltxv": TinyFamily("ltxv", {"adaln_single.emb.timestep_embedder.linear_1.bias": (1,),
                                "transformer_blocks.0.attn2.to_k.weight": (128, 128)},
                       {"num_attention_heads": 2, "attention_head_dim": 64, "caption_channels": 64},
                       context=64, extra_cond={"attention_mask": torch.ones(1, 8, dtype=torch.long)}),
    # Hunyuan-DiT: CLIP text as the context, mT5 text and both masks beside it; 4 blocks so that one long skip
    # connection is there; the pooler's positions fix the mT5 length (8 tokens)
    "hydit": TinyFamily("hydit", {"mlp_t5.0.weight": (1, 1), "x_embedder.proj.weight": (128, 4, 2, 2),
                                  "extra_embedder.0.weight": (1, 1024), **{f"blocks.{i}.x": (1,) for i in range(4)}},
                        {"num_heads": 2, "text_states_dim": 64, "text_states_dim_t5": 64, "text_len": 8, "text_len_t5": 8},
                        context=64, extra_cond={"attention_mask": torch.ones(1, 8, dtype=torch.long),
                                                "conditioning_mt5xl": torch.randn(1, 8, 64,
                                                                                  generator=torch.Generator().manual_seed(7)),
                                                "attention_mask_mt5xl": torch.ones(1, 8, dtype=torch.long)}),
    # Cosmos 1 (EDM): width from the first block's q, input channels (+ the padding mask) x 2 x 2 from the embedder;
    # a width other than 4096 reads as the 14B model, then shrunk to one block of two heads
    "cosmos": TinyFamily("cosmos", {"blocks.block0.blocks.0.block.attn.to_q.0.weight": (128, 1),
                                    "x_embedder.proj.1.weight": (128, (16 + 1) * 4)},
                         {"num_blocks": 1, "num_heads": 2, "crossattn_emb_channels": 64, "adaln_lora_dim": 32},
                         context=64),
    # Cosmos Predict2 (rectified flow): width and input channels from the embedder; one block (0.33.0 counts the
    # blocks, 0.3.75's detector leaves the constructor's 10)
    "cosmos_predict2": TinyFamily("cosmos_predict2", {"blocks.0.mlp.layer1.weight": (1, 1),
                                                      "x_embedder.proj.1.weight": (128, (16 + 1) * 4)},
                                  {"num_blocks": 1, "num_heads": 2, "crossattn_emb_channels": 64, "adaln_lora_dim": 32},
                                  context=64),
    # Stable Cascade stage C (the prior) and stage B (the decoder): two levels, attention on the second; stage C's
    # image embedding stays at CLIP vision's 768 (ComfyUI gives zeros when there is no image); stage B reads the
    # prior's effnet latents (zeros here, as ComfyUI gives without a prior) at 1/42 of its own 1/4-scale latents
    "cascade_c": TinyFamily("cascade_c", {"clf.1.weight": (1, 1), "clip_txt_mapper.weight": (2048, 1)},
                            {"c_cond": 64, "c_hidden": [64, 64], "nhead": [2, 2], "blocks": [[1, 1], [1, 1]],
                             "block_repeat": [[1, 1], [1, 1]], "c_clip_text": 64, "c_clip_text_pooled": 32},
                            context=64, pooled=32),
    "cascade_b": TinyFamily("cascade_b", {"clf.1.weight": (1, 1), "clip_mapper.weight": (1, 1),
                                          "down_blocks.1.0.channelwise.0.weight": (1, 640)},
                            {"c_cond": 64, "c_hidden": [32, 64], "nhead": [-1, 2], "blocks": [[1, 1], [1, 1]],
                             "block_repeat": [[1, 1], [1, 1]], "level_config": ["CT", "CTA"], "dropout": [0, 0],
                             "c_clip": 32}, context=64, pooled=32, downscale=4),
    # CogVideoX 1.0: width (6 x 128) and time width from block 0's norm, 64-wide heads, a 2 x 2 conv patch embedder
    "cogvideox": TinyFamily("cogvideox", {"blocks.0.norm1.linear.weight": (6 * 128, 64),
                                          "patch_embed.proj.weight": (128, 16, 2, 2),
                                          "patch_embed.text_proj.weight": (128, 64)}, {}, context=64),
    # ERNIE-Image: its detector fixes nothing but the model (the class's defaults are the full model's sizes)
    "ernie": TinyFamily("ernie", {"layers.0.mlp.linear_fc2.weight": (1, 1)},
                        {"hidden_size": 256, "num_attention_heads": 2, "num_layers": 1, "ffn_hidden_size": 512,
                         "text_in_dim": 64}, context=64),
    # Krea 2: width and input channels from `first`, heads of 128 from wq / wk (grouped-query: one k, v head), two
    # text layers of 64 fused by its projector; the context packs the text layers side by side (2 x 64)
    "krea2": TinyFamily("krea2", {"txtfusion.projector.weight": (1, 2), "first.weight": (H, 16 * 2 * 2),
                                  "blocks.0.attn.wq.weight": (H, 1), "blocks.0.attn.wk.weight": (128, 1),
                                  "txtfusion.layerwise_blocks.0.prenorm.scale": (64,)},
                        {"txtheads": 2, "txtkvheads": 2}, context=2 * 64),
    # Boogu: Omnigen 2's successor; width, layer counts and instruction width from its keys, then Omnigen 2's tiny
    # heads (3 of 40, one k, v head)
    "boogu": TinyFamily("boogu", {"double_stream_layers.0.img_instruct_attn.processor.img_to_q.weight": (1, 1),
                                  "x_embedder.weight": (120, 1), "single_stream_layers.0.x": (1,),
                                  "noise_refiner.0.x": (1,), "time_caption_embed.caption_embedder.0.weight": (64,)},
                        {"num_attention_heads": 3, "num_kv_heads": 1, "axes_dim_rope": [8, 16, 16],
                         "axes_lens": [300, 64, 64], "multiple_of": 32}, context=64,
                        extra_cond={"attention_mask": torch.ones(1, 8, dtype=torch.long)}),
    # Mage-Flow: told from Qwen-Image by its 2560-wide text norm and 128-channel output; then two heads of 128
    "mage_flow": TinyFamily("mage_flow", {"txt_norm.weight": (2560,), "proj_out.weight": (128, 1),
                                          "transformer_blocks.0.x": (1,)},
                            {"num_attention_heads": 2, "joint_attention_dim": 64}, context=64),
    # Lens: heads of 64 from img_in's width (2), input / output channels from img_in / proj_out, one text layer of 64
    "lens": TinyFamily("lens", {"transformer_blocks.0.attn.norm_added_q.weight": (1,),
                                "transformer_blocks.0.img_mlp.w1.weight": (1, 1), "img_in.weight": (128, 128),
                                "proj_out.weight": (32 * 4, 1), "txt_norm.weight": (64,)}, {}, context=64),
    # JoyImage: its config class fixes rope axes of 128, so two heads of 128 (read from the q norm and img_in)
    "joyimage": TinyFamily("joyimage", {"double_blocks.0.attn.img_attn_qkv.weight": (1, 1),
                                        "double_blocks.0.attn.img_attn_q_norm.weight": (128,),
                                        "condition_embedder.time_embedder.linear_1.weight": (1, 1),
                                        "img_in.weight": (H, 16, 1, 2, 2)}, {"text_dim": 64}, context=64),
}
# Z-Image in pixel space: the detector's Z-Image width (3840) to enter its branch, then the pixel decoder read from
# its keys (8 x 8 RGB patches, 8 frequencies, one residual block of 64), shrunk like the tiny Z-Image
_ZPX = 8 * 8 * 3
ARCHS["zimage_pixel"] = replace(tf.TINY["zimage"], name="zimage_pixel", downscale=1, keys={
    **tf.TINY["zimage"].keys, "cap_embedder.1.weight": (3840, 64), "x_embedder.weight": (1, _ZPX),
    "dec_net.final_layer.linear.weight": (_ZPX, 1), "dec_net.input_embedder.embedder.0.weight": (1, _ZPX + 8 * 8),
    "dec_net.cond_embed.weight": (64, 1), "dec_net.res_blocks.0.x": (1,)},
    overrides={**tf.TINY["zimage"].overrides, "dim": 256})
# Wan 2.1 VACE: the tiny Wan with one VACE block, its control embedder read from its keys (96 channels: ComfyUI
# gives zero control frames and a full mask when there are none)
ARCHS["wan_vace"] = replace(ARCHS["wan"], name="wan_vace", keys={
    **ARCHS["wan"].keys, "vace_patch_embedding.weight": (H, 96, 1, 2, 2), "vace_blocks.0.x": (1,)})
# Flux Fill: the tiny Flux-dev with 96 input channels (latent, mask and masked image), read from img_in's width
ARCHS["flux_inpaint"] = replace(tf.TINY["flux_dev"], name="flux_inpaint",
                                keys={**tf.TINY["flux_dev"].keys, "img_in.weight": (H, 96 * 2 * 2)})
# Hunyuan-DiT 1.1+: its detector reads the full model's extra-embedder width, 3968 (pooled text, image size and
# style inputs); the tiny model then builds its own, narrower one
ARCHS["hydit1"] = replace(ARCHS["hydit"], name="hydit1", keys={**ARCHS["hydit"].keys, "extra_embedder.0.weight": (1, 3968)})


def _tiny_unet(cls) -> dict:
    """A one-level UNet config for an SD-style class from its own detection keys (text width, pooled /
    ADM input, input channels, linear projections); width 64 instead of the model_channels it detects by."""
    uc = cls.unet_config
    adm = uc.get("adm_in_channels")
    return {**tf.TINY_SDXL_UNET, "in_channels": uc.get("in_channels", 4), "context_dim": uc.get("context_dim", 1024),
            "use_linear_in_transformer": uc["use_linear_in_transformer"], "adm_in_channels": adm,
            "num_classes": "sequential" if adm else None}


# class -> (architecture, what the class changes beyond its own unet_config)
CLASSES = {
    "SDXL": ("sdxl", {}), **{name: ("unet", {}) for name in (
        "SD15", "SD15_instructpix2pix", "SD20", "SD21UnclipL", "SD21UnclipH", "LotusD", "SDXLRefiner",
        "SSD1B", "KOALA_700M", "KOALA_1B", "Segmind_Vega", "SDXL_instructpix2pix")},
    # the x4 upscaler's class sets self-attention off per level for its four levels: four one-block levels
    "SD_X4Upscaler": ("unet", {"channel_mult": [1, 1, 1, 1], "num_res_blocks": [1] * 4,
                               "transformer_depth": [1] * 4, "transformer_depth_output": [1] * 8}), "Flux": ("flux_dev", {}), "FluxSchnell": ("flux_schnell", {}),
    "FluxInpaint": ("flux_inpaint", {}), "SD3": ("sd35", {}),
    "Lumina2": ("lumina2", {}), "ZImage": ("zimage", {}), "QwenImage": ("qwen_image", {}),
    "Flux2": ("flux2", {}),
    "LongCatImage": ("longcat", {}),
    "HunyuanVideo": ("hunyuan_video", {}),
    "HunyuanVideo15": ("hunyuan_video", {"vec_in_dim": None, "in_channels": 65, "out_channels": 32}),
    "HunyuanVideo15_SR_Distilled": ("hunyuan_video", {"vec_in_dim": None, "in_channels": 98, "out_channels": 32}),
    "HunyuanImage21": ("hunyuan_video", {"in_channels": 64, "out_channels": 64, "patch_size": [1, 1],
                                         "axes_dim": [64, 64]}),
    "WAN21_T2V": ("wan", {}), "WAN21_I2V": ("wan", {}), "WAN22_T2V": ("wan", {"in_dim": 48}),
    "WAN21_FlowRVS": ("wan", {}), "WAN21_CausalAR_T2V": ("wan", {}), "WAN21_FunControl2V": ("wan", {}),
    "WAN21_Camera": ("wan", {}), "WAN22_Camera": ("wan", {}),
    "WAN21_Vace": ("wan_vace", {}),
    **{name: ("wan", {}) for name in ("WAN21_HuMo", "WAN22_Animate", "WAN_Animate2", "WAN21_SCAIL", "WAN21_SCAIL2")},
    "HunyuanVideoI2V": ("hunyuan_video", {}), "HunyuanVideoSkyreelsI2V": ("hunyuan_video", {}),
    "Kandinsky5": ("kandinsky5", {}), "Kandinsky5Image": ("kandinsky5", {"axes_dims": (16, 24, 24)}),
    "AuraFlow": ("aura", {}),
    "PixArtAlpha": ("pixart", {"micro_condition": True}), "PixArtSigma": ("pixart", {"micro_condition": False}),
    "Omnigen2": ("omnigen2", {}),
    "HiDream": ("hidream", {}),
    "Chroma": ("chroma", {}), "ChromaRadiance": ("chroma_radiance", {}),
    "GenmoMochi": ("mochi", {}), "LTXV": ("ltxv", {}),
    "HunyuanDiT": ("hydit", {}), "HunyuanDiT1": ("hydit1", {}),
    **{name: ("cogvideox", {}) for name in ("CogVideoX_T2V", "CogVideoX_I2V", "CogVideoX_Inpaint")},
    "ZImagePixelSpace": ("zimage_pixel", {}), "ErnieImage": ("ernie", {}), "Krea2": ("krea2", {}), "Boogu": ("boogu", {}), "MageFlow": ("mage_flow", {}), "Lens": ("lens", {}), "JoyImage": ("joyimage", {}),
    "Stable_Cascade_C": ("cascade_c", {}), "Stable_Cascade_B": ("cascade_b", {}),
    "CosmosT2V": ("cosmos", {}), "CosmosI2V": ("cosmos", {}),
    "CosmosT2IPredict2": ("cosmos_predict2", {}), "CosmosI2VPredict2": ("cosmos_predict2", {}),
}


# Image size in px where 64 is too small for the model (PixArt rounds its latent size / 64 for its positional embedding: at least 48 latent rows).
SIZES = {"PixArtAlpha": 384, "PixArtSigma": 384}


def size_for(class_name: str) -> int:
    return SIZES.get(class_name, 64)


def spec_for(class_name: str) -> TinyFamily:
    """The TinyFamily that builds class `class_name` of this host tiny."""
    import comfy.supported_models

    arch, changes = CLASSES[class_name]
    if arch in tf.TINY:
        return replace(tf.TINY[arch], config_class=class_name)
    cls = getattr(comfy.supported_models, class_name)
    if arch == "unet":
        unet = {**_tiny_unet(cls), **changes}
        pooled = 1280 if (unet["adm_in_channels"] or 0) >= 2560 else 0  # SD-XL's pooled text in its ADM input
        return TinyFamily(class_name, {}, {}, context=unet["context_dim"], pooled=pooled, config_class=class_name,
                          unet_config=unet)
    base = ARCHS[arch]
    frames = getattr(cls.latent_format, "latent_dimensions", 2) == 3
    overrides = {**cls.unet_config, **base.overrides, **changes}
    return replace(base, name=class_name, overrides=overrides, config_class=class_name, frames=frames)


# Classes whose network, on some hosts, calls a comfy_kitchen kernel that has no backward (its inference-only fused
# RMS-norm + RoPE or RoPE) even while ComfyUI's in_training flag is up, so that no training can pass through it:
# class -> (the network's module, the kernel). On a host whose module calls it the class is left out of
# host_classes(), and the test checks that training fails there for that reason.
NO_BACKWARD = {**{name: ("comfy.ldm.cosmos.predict2", "rms_rope_split_half")
                  for name in ("CosmosT2IPredict2", "CosmosI2VPredict2")},
               "ErnieImage": ("comfy.ldm.ernie.model", "apply_rope_split_half"),
               "JoyImage": ("comfy.ldm.joyimage.model", "rms_rope")}


def kernel_without_backward(class_name: str) -> str:
    """The kernel without a backward that this host's network of `class_name` calls, or ''."""
    if class_name not in NO_BACKWARD:
        return ""
    module, kernel = NO_BACKWARD[class_name]
    source = inspect.getsource(importlib.import_module(module))
    return kernel if re.search(rf"\b(?:ck|comfy_kitchen)\.{kernel}\(", source) else ""


def _host_names() -> set[str]:
    try:
        import comfy.supported_models
    except ImportError:
        return set()
    return {cls.__name__ for cls in comfy.supported_models.models}


def host_classes() -> list[str]:
    """The classes of CLASSES this host's supported_models has and can train ([] where no ComfyUI is found: the
    tests skip)."""
    have = _host_names()
    return [name for name in CLASSES if name in have and not kernel_without_backward(name)]


def host_classes_without_backward() -> list[str]:
    """The classes of CLASSES this host has whose network calls a kernel without a backward (NO_BACKWARD)."""
    have = _host_names()
    return [name for name in CLASSES if name in have and kernel_without_backward(name)]

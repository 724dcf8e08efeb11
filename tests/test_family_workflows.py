"""The family workflows' API twins run on a real ComfyUI server with tiny models of their family.

A tiny random-weight model is written under a test name in the folder its loader lists (a diffusion
model for Load Diffusion Model, a checkpoint for Load Checkpoint, a 16-channel TAESD for Load VAE), with
the key names and shapes the host's detector reads, so ComfyUI's own loaders build it; the workflow runs
as committed, shrunk in a copy (2 training steps, rank 4, 64 px, 2 sampling steps), except its
text-encoder loader: ComfyUI builds every DiT's text encoder at its full published size whatever the
file holds (T5-XXL, Qwen2.5-VL 7B, Qwen3 4B, umT5-XXL), so the tiny SD1.5 checkpoint's CLIP-L (768 wide)
stands in, and the tiny models take 768-wide text. Not run, and why: `NOT_RUN` below.
"""
import copy

import pytest
import torch
from safetensors.torch import save_file

from support.tiny_families import TinyFamily
from support.tiny_model import _random_state_dict
from test_workflows import images_of, load_api, text_of, tlora_config
from support.workflow_format import find_node

SIZE = 64
TINY = {"steps": 2, "rank": 4, "min_rank": 2, "resolution": SIZE}  # the family's optimiser at its recipe's rate
CLIP_LOADERS = ("CLIPLoader", "DualCLIPLoader", "TripleCLIPLoader")
NOT_RUN = {
    "train_on_qwen_image": "the detector reads only Qwen-Image's depth and input channels; its width (3072, "
                           "about 0.35 B parameters a block) and its text width (3584, Qwen2.5-VL 7B's) are fixed",
    "train_on_z_image": "the detector sets heads and rope axes only for the two published widths (Lumina 2's "
                        "2304, Z-Image's 3840); a narrower file builds no working model",
    "train_on_wan22": "Wan's text width stays umT5-XXL's 4096 whatever the file holds, its 2.2 VAE is built at "
                      "full size, and the family is not in this branch's table (training refuses it)",
}
H = 256  # two heads of 128 (the width Flux's rope axes fix per head)
TINY_SD35 = TinyFamily(  # MMDiT-X with SD3.5's qk norm, 2 blocks of 128, CLIP-L's 768-wide text and pooled input
    "sd35_clip_l",
    {"joint_blocks.0.context_block.attn.qkv.weight": (384, 128), "joint_blocks.1.context_block.attn.qkv.weight":
     (384, 128), "x_embedder.proj.weight": (128, 16, 2, 2), "final_layer.linear.weight": (64, 128),
     "y_embedder.mlp.0.weight": (128, 768), "context_embedder.weight": (128, 768), "pos_embed": (1, 256, 128),
     "joint_blocks.0.context_block.attn.ln_q.weight": (64,), "joint_blocks.0.x_block.attn2.qkv.weight": (384, 128)},
    {}, context=768, pooled=768)
TINY_FLUX = TinyFamily(  # FLUX.1-dev's layout (guidance input) at 256 wide, one double and one single block
    "flux_dev_clip_l",
    {"double_blocks.0.img_attn.norm.key_norm.scale": (128,), "img_in.weight": (H, 64), "txt_in.weight": (H, 768),
     "vector_in.in_layer.weight": (H, 768), "guidance_in.in_layer.weight": (H, 256),
     "double_blocks.0.img_attn.qkv.weight": (1, 1), "single_blocks.0.linear1.weight": (1, 1)},
    {}, context=768, pooled=768)


def _diffusion_model_tensors(spec: TinyFamily) -> dict:
    from support import tiny_families
    patcher, _ = tiny_families.build(spec)
    return {k: v.detach().to(torch.float16).contiguous() for k, v in patcher.model.diffusion_model.state_dict().items()}


def _taesd16_tensors(scale: float, shift: float) -> dict:
    """A TAESD of 16 latent channels (what Load VAE reads as a Flux / SD3 VAE from its taesd_* keys)."""
    import comfy.taesd.taesd
    sd = _random_state_dict(comfy.taesd.taesd.TAESD(latent_channels=16), torch.Generator().manual_seed(1))
    sd.update(vae_scale=torch.tensor(scale), vae_shift=torch.tensor(shift))
    return {k: v.to(torch.float16).contiguous() for k, v in sd.items()}


def _write(folder, name, tensors) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / name), metadata={"format": "pt"})
    return name


def _detected(path, prefix: str) -> str:
    """The config class the host's detector finds in a file (its diffusion model under `prefix`)."""
    import comfy.model_detection
    import comfy.utils
    sd = comfy.utils.load_torch_file(str(path))
    return type(comfy.model_detection.model_config_from_unet(sd, prefix)).__name__


def _shrink(api: dict, name: str, files: dict) -> dict:
    """The committed workflow with tiny settings and files; its text-encoder loader replaced by the tiny
    SD1.5 checkpoint's CLIP (output 1 of Load Checkpoint instead of output 0 of a CLIP loader)."""
    wf = copy.deepcopy(api)
    clip_id = next(i for i, n in wf.items() if n["class_type"] in CLIP_LOADERS)
    wf[clip_id] = {"class_type": "CheckpointLoaderSimple", "_meta": {"title": "tiny CLIP-L"},
                   "inputs": {"ckpt_name": "tiny_sd15.safetensors"}}
    for node_id, node in wf.items():
        inputs, kind = node["inputs"], node["class_type"]
        for key, value in inputs.items():
            if value == [clip_id, 0]:
                inputs[key] = [clip_id, 1]
        if node_id == clip_id:
            continue
        if kind in files:
            inputs[files[kind][0]] = files[kind][1]
        elif kind == "LoadImage":
            inputs["image"] = "tlora_sample.png"
        elif kind == "TLoraTrainFromImage":
            inputs.update(TINY, filename_prefix=f"wf_test/{name}", preview_every=TINY["steps"], preview_steps=2)
        elif kind == "KSampler":
            inputs["steps"] = 2
        elif kind == "EmptySD3LatentImage":
            inputs.update(width=SIZE, height=SIZE)
        elif kind == "SaveImage":
            inputs["filename_prefix"] = f"wf_test/{name}"
    return wf


def _run_and_check(server, api, name, family):
    entry = server.run(api, timeout=600)
    file_name = text_of(entry, find_node(api, "PreviewAny", title="Saved T-LoRA file"))
    config = tlora_config(server.base_dir / "models" / "loras" / file_name)
    assert (config["family"], config["rank"], config["variant"]) == (family, 4, "vanilla_tlora"), config
    assert [s.shape for s in images_of(server, entry, find_node(api, "SaveImage"))] == [(SIZE, SIZE, 3)]
    previews = images_of(server, entry, find_node(api, "PreviewImage", title="Previews while training"))
    assert [p.shape for p in previews] == [(SIZE, SIZE, 3)]
    assert "memory auto: training on the CPU" in server.log_text()  # the workflows' memory preset, on a CPU


def test_every_family_workflow_is_run_here_or_says_why_not():
    from test_workflows import FAMILY_WORKFLOWS
    assert set(FAMILY_WORKFLOWS) == set(NOT_RUN) | {"train_on_sd35", "train_on_flux"}


def test_train_on_sd35_runs_on_a_tiny_sd35(comfy_server):
    base = comfy_server.base_dir / "models"
    tensors = {f"model.diffusion_model.{k}": v for k, v in _diffusion_model_tensors(TINY_SD35).items()}
    tensors.update({f"first_stage_model.{k}": v for k, v in _taesd16_tensors(1.5305, 0.0609).items()})
    name = _write(base / "checkpoints", "tiny_sd35.safetensors", tensors)
    assert _detected(base / "checkpoints" / name, "model.diffusion_model.") == "SD3"
    api = _shrink(load_api("train_on_sd35"), "train_on_sd35", {"CheckpointLoaderSimple": ("ckpt_name", name)})
    _run_and_check(comfy_server, api, "train_on_sd35", "SD3")


def test_train_on_flux_runs_on_a_tiny_flux(comfy_server):
    import comfy.model_detection
    sd = {k: torch.empty(s, device="meta") for k, s in TINY_FLUX.keys.items()}
    heads = comfy.model_detection.detect_unet_config(sd, "")["num_heads"]
    if heads * 128 != H:
        pytest.skip(f"this host's Flux detector fixes {heads} heads of 128 whatever the file's width, so the "
                    f"smallest Flux that Load Diffusion Model reads is {heads * 128} wide (about 0.56 B parameters): "
                    "too big for the CPU suite (0.33.0 derives the heads from the width)")
    base = comfy_server.base_dir / "models"
    unet = _write(base / "diffusion_models", "tiny_flux.safetensors", _diffusion_model_tensors(TINY_FLUX))
    vae = _write(base / "vae", "tiny_taef1.safetensors", _taesd16_tensors(0.3611, 0.1159))
    assert _detected(base / "diffusion_models" / unet, "") == "Flux"
    api = _shrink(load_api("train_on_flux"), "train_on_flux",
                  {"UNETLoader": ("unet_name", unet), "VAELoader": ("vae_name", vae)})
    _run_and_check(comfy_server, api, "train_on_flux", "Flux")

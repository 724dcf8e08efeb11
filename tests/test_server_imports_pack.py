"""The test fixtures themselves: the tiny checkpoint is an SD1.5 to ComfyUI, and a real ComfyUI server
imports this repo as a custom node pack without errors and lists its nodes."""
import re
from pathlib import Path

import pytest
import torch

from support.comfy_server import PACK_DIR_NAME

REPO_ROOT = Path(__file__).resolve().parents[1]
SD15_KEYS = {"context_dim": 768, "model_channels": 320, "use_linear_in_transformer": False, "adm_in_channels": None}


# ---- the tiny checkpoint, in-process ------------------------------------------------------------

def test_tiny_checkpoint_is_detected_as_sd15(comfy, tiny_sd15_checkpoint):
    from support.tiny_model import TINY_UNET_CONFIG, detect

    name, unet_config = detect(tiny_sd15_checkpoint)
    assert name == "SD15"
    assert {k: unet_config[k] for k in SD15_KEYS} == SD15_KEYS
    detected_shape = {k: unet_config[k] for k in ("num_res_blocks", "channel_mult", "transformer_depth",
                                                  "transformer_depth_output", "transformer_depth_middle")}
    assert detected_shape == {k: TINY_UNET_CONFIG[k] for k in detected_shape}


def test_tiny_sd15_loads_in_fp32_with_a_taesd(comfy, tiny_sd15):
    import comfy.model_base
    import comfy.supported_models
    import comfy.taesd.taesd

    patcher, clip, vae = tiny_sd15
    assert type(patcher.model) is comfy.model_base.BaseModel
    assert type(patcher.model.model_config) is comfy.supported_models.SD15
    assert patcher.model.get_dtype() == torch.float32
    assert clip.cond_stage_model.dtypes == {torch.float32}
    assert isinstance(vae.first_stage_model, comfy.taesd.taesd.TAESD)
    n_unet = sum(p.numel() for p in patcher.model.diffusion_model.parameters())
    assert 25_000_000 < n_unet < 27_000_000  # 1 level, 1 res block


def test_tiny_checkpoint_is_deterministic_for_a_seed(comfy, tiny_sd15_checkpoint):
    from safetensors import safe_open

    from support import tiny_model

    # Rebuild only the UNet part (seeded with seed * 1000 + 0, see build_tiny_sd15_state_dict).
    again = tiny_model._unet_tensors(torch.Generator().manual_seed(0))
    other = tiny_model._unet_tensors(torch.Generator().manual_seed(1000))
    with safe_open(str(tiny_sd15_checkpoint), "pt") as f:
        for k in ("input_blocks.0.0.weight", "middle_block.1.transformer_blocks.0.attn2.to_k.weight", "out.2.bias"):
            stored = f.get_tensor(tiny_model.UNET_PREFIX + k)
            assert torch.equal(stored, again[k].to(stored.dtype))
            assert not torch.equal(stored, other[k].to(stored.dtype))


def test_tiny_sd15_predicts_finite_noise_of_unit_scale(comfy, tiny_sd15):
    patcher, _, _ = tiny_sd15
    gen = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(1, 4, 16, 16, generator=gen), torch.randn(1, 77, 768, generator=gen)
    with torch.no_grad():
        out = patcher.model.diffusion_model(x, torch.tensor([500.0]), context=ctx)
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert 0.1 < out.std().item() < 10.0


# ---- the real server ------------------------------------------------------------------------------

def _pack_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if PACK_DIR_NAME in line]


def test_server_imports_the_pack_without_errors(comfy_server):
    # the start-up log only: the session's server also runs tests that make the pack raise on purpose
    log = comfy_server.startup_log
    pack_lines = _pack_lines(log)
    failures = [line for line in pack_lines
                if "IMPORT FAILED" in line or "Cannot import" in line or "comfy_entrypoint" in line]
    assert not failures, "\n".join(failures) + "\n" + log[-6000:]
    # ComfyUI prints one timing line per custom node; ours must be there and not marked failed.
    timing = [line for line in pack_lines if re.search(r"seconds: .*custom_nodes[/\\]" + PACK_DIR_NAME, line)]
    assert timing, "no import timing line for the pack:\n" + log[-6000:]
    # A traceback frame in the pack's files (through the symlink or the real path) means it raised.
    frames = re.findall(r'^\s*File "([^"]+)", line \d+', log, flags=re.MULTILINE)
    ours = [f for f in frames if PACK_DIR_NAME in f or (f.startswith(str(REPO_ROOT)) and ".deps" not in f)]
    assert not ours, "traceback through the pack:\n" + "\n".join(ours) + "\n" + log[-6000:]


def test_server_lists_the_pack_nodes(comfy_server):
    info = comfy_server.object_info()
    ours = {k: v for k, v in info.items() if k.startswith("TLora")}
    assert ours, f"no TLora* nodes in /object_info ({len(info)} nodes listed)"
    for node_id, spec in ours.items():
        assert spec.get("python_module", "").endswith(PACK_DIR_NAME), (node_id, spec.get("python_module"))
    # The fixture's model and image are visible to the loader nodes.
    ckpts = info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0]
    assert "tiny_sd15.safetensors" in ckpts
    images = info["LoadImage"]["input"]["required"]["image"][0]
    assert "tlora_sample.png" in images


def test_server_rejects_a_malformed_prompt_with_node_errors(comfy_server):
    from support.comfy_server import ComfyServerError

    with pytest.raises(ComfyServerError, match="HTTP 400"):
        comfy_server.post_prompt({"1": {"class_type": "NoSuchNodeType", "inputs": {}}})

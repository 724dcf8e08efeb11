"""Test setup: the pack as an importable package, an in-process ComfyUI, a tiny model, a real server.

- `tlora_pack` is the repo root registered as a package WITHOUT running its `__init__.py` (which needs
  ComfyUI), so pure-core tests import `tlora_pack.tlora_core...` with no ComfyUI at all.
- ComfyUI's flags (CPU, pytorch attention) are set as this file loads; the `comfy` fixture imports it.
- Fixtures that need ComfyUI skip (with the reason) only when the ComfyUI tree is missing;
  `scripts/setup_env.sh` always provides it, at .deps/ComfyUI or $TLORA_COMFYUI_DIR.
- The expensive things (model build, server start) happen once per session.
"""
import sys
import types
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent

if str(TESTS_DIR) not in sys.path:  # `support.*` helpers
    sys.path.insert(0, str(TESTS_DIR))

if "tlora_pack" not in sys.modules:
    _pack = types.ModuleType("tlora_pack", "The T-LoRA node pack (repo root); __init__.py not executed.")
    _pack.__path__ = [str(REPO_ROOT)]
    _pack.__package__ = "tlora_pack"
    sys.modules["tlora_pack"] = _pack

from support import comfy_env  # noqa: E402

# Flags first, at collection: a test module that imports comfy.* at its top then still gets the CPU
# set-up (model_management reads the flags once, at its import). Nothing heavy is imported here.
if (comfy_env.comfyui_dir() / "comfy" / "model_management.py").is_file():
    comfy_env.setup_comfy()

TINY_CHECKPOINT_NAME = "tiny_sd15.safetensors"
SAMPLE_IMAGE_NAME = "tlora_sample.png"


@pytest.fixture(scope="session")
def comfy():
    """ComfyUI imported in-process on the CPU. Returns a namespace: dir, args, and the core modules."""
    path = comfy_env.comfyui_dir()
    if not (path / "comfy" / "model_management.py").is_file():
        pytest.skip(f"ComfyUI not found at {path} (run scripts/setup_env.sh or set TLORA_COMFYUI_DIR)")
    args = comfy_env.setup_comfy(path)
    import comfy.model_management
    import comfy.samplers
    import comfy.sd
    import comfy.utils

    return types.SimpleNamespace(dir=path, args=args, model_management=comfy.model_management,
                                 sd=comfy.sd, samplers=comfy.samplers, utils=comfy.utils)


@pytest.fixture(scope="session")
def tiny_sd15_checkpoint(comfy, tmp_path_factory) -> Path:
    """Path of the tiny random SD1.5 checkpoint (fp16 .safetensors, seed 0), built once per session."""
    from support.tiny_model import build_tiny_sd15_checkpoint

    path = tmp_path_factory.mktemp("models") / TINY_CHECKPOINT_NAME
    build_tiny_sd15_checkpoint(path, seed=0)
    return path


@pytest.fixture(scope="session")
def tiny_sd15(comfy, tiny_sd15_checkpoint):
    """(model_patcher, clip, vae) of the tiny checkpoint, loaded by ComfyUI, all in fp32 on the CPU.

    Shared by the whole session: clone() the patcher / clip before changing them.
    fp32 is forced for the text encoder too (ComfyUI keeps it in fp16 on a CPU by default).
    """
    import torch

    patcher, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(
        str(tiny_sd15_checkpoint), output_vae=True, output_clip=True,
        model_options={"dtype": torch.float32}, te_model_options={"dtype": torch.float32})
    return patcher, clip, vae


@pytest.fixture(scope="session")
def sample_image(tmp_path_factory) -> Path:
    """A synthetic 256 px RGB PNG (no downloads)."""
    from support.tiny_model import make_sample_image

    return make_sample_image(tmp_path_factory.mktemp("images") / SAMPLE_IMAGE_NAME, size=256)


@pytest.fixture(scope="session")
def comfy_server(comfy, tiny_sd15_checkpoint, sample_image, tmp_path_factory):
    """A real ComfyUI server (subprocess, 127.0.0.1, free port) with this repo as custom_nodes/comfyui-tlora.

    models/checkpoints holds `tiny_sd15.safetensors`, input/ holds `tlora_sample.png`. The object is a
    support.comfy_server.ComfyServer: post_prompt(wf) -> prompt_id, wait(prompt_id, timeout) -> history
    entry, run(wf, timeout), object_info(), log_text(), output_path(item), base_dir, url.
    """
    from support.comfy_server import ComfyServer, prepare_base_dir

    base = prepare_base_dir(tmp_path_factory.mktemp("comfy_base"), REPO_ROOT,
                            checkpoints=[tiny_sd15_checkpoint], input_files=[sample_image])
    # 0.33 imports far more at start-up than 0.3.75; on 2 busy cores that can take a minute or more.
    server = ComfyServer(comfy.dir, base).start(timeout=300)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(autouse=True)
def _shared_model_left_unpatched():
    """The session's models are shared: after each test, unload whatever ComfyUI still holds loaded,
    which unpatches its weights, so no test sees another test's LoRA or T-LoRA patches."""
    yield
    mm = sys.modules.get("comfy.model_management")
    if mm is not None:
        mm.unload_all_models()

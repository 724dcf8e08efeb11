"""The pack under ComfyUI's dynamic VRAM loading (ModelPatcherDynamic + comfy-aimdo): runs
tests/gpu/dynamic_vram_check.py in a fresh Python on the suite's host, because ComfyUI must start on the
GPU there while this process set it up on the CPU (tests/conftest.py).

- With a CUDA device: the full check. Without one it is skipped with the reason: dynamic VRAM cannot run
  on a CPU (see the script's docstring), so no CPU machine can show it.
- On a host with dynamic VRAM (ComfyUI 0.33 on), also without a GPU: the same checks as a CPU dry run
  with the plain ModelPatcher, so that the script a GPU machine runs is itself tested.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent / "dynamic_vram_check.py"
NOT_APPLICABLE = 3


def _run(comfy_dir: Path, *args) -> subprocess.CompletedProcess:
    env = dict(os.environ, TLORA_COMFYUI_DIR=str(comfy_dir))
    env.pop("PYTHONPATH", None)
    return subprocess.run([sys.executable, str(SCRIPT), *args], env=env, capture_output=True, text=True,
                          timeout=1800)


def _has_dynamic_vram(comfy_dir: Path) -> bool:
    return (comfy_dir / "comfy" / "memory_management.py").is_file()


def test_script_checks_hold_in_a_cpu_dry_run(comfy):
    if not _has_dynamic_vram(comfy.dir):
        pytest.skip(f"the ComfyUI at {comfy.dir} has no dynamic VRAM (ComfyUI 0.33 on): the script is for such hosts")
    done = _run(comfy.dir, "--cpu-dry-run")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "CPU dry run: all checks hold" in done.stdout, done.stdout


def test_apply_and_training_give_w_plus_dw_under_dynamic_vram(comfy):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device: ComfyUI's dynamic VRAM (ModelPatcherDynamic, comfy-aimdo) runs only on a GPU")
    done = _run(comfy.dir)
    if done.returncode == NOT_APPLICABLE:
        pytest.skip(done.stdout.strip())
    assert done.returncode == 0, done.stdout + done.stderr

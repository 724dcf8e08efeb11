"""The pack under ComfyUI's dynamic VRAM loading (ModelPatcherDynamic + comfy-aimdo, ComfyUI 0.33 on NVIDIA).

    TLORA_COMFYUI_DIR=$TLORA_COMFYUI_UPSTREAM .deps/venv-0.33.0/bin/python tests/gpu/dynamic_vram_check.py

Needs a CUDA GPU; it cannot be forced on a CPU: ModelPatcherDynamic.__new__ hands back a plain ModelPatcher
for a CPU load device, its constructor allocates comfy-aimdo host buffers whose native library loads only
with CUDA, and the streamed-weight path (comfy.ops.resolve_cast_module_with_vbar, which applies each
layer's weight_function after streaming the weight in) runs only for weights on a CUDA device.

It turns dynamic VRAM on as ComfyUI's main.py does (comfy_aimdo.control.init before torch, init_devices,
CoreModelPatcher = ModelPatcherDynamic, aimdo_enabled), loads the tiny random SD1.5 model through it and
checks, in fp32 against a dense model ComfyUI builds from a state dict holding W + dW (not dynamic):
1. Apply T-LoRA gives W + strength * dW(t) at several t, through the streamed weights (ModelPatcherDynamic
   rebuilds every weight_function list when it loads: the pack's must come back each time);
2. the same after the model is unloaded and loaded again;
3. stacked with a stock LoRA (which dynamic loading applies through weight_lowvram_function);
4. training 3 steps on the dynamic patcher gives the losses of the same training on a plain ModelPatcher,
   and the trained T-LoRA applied gives W + dW(t).
Exit status 0: all hold; 1: a check failed; 3: not applicable here (no CUDA, or a ComfyUI without dynamic
VRAM). `--cpu-dry-run` runs the same checks with the plain ModelPatcher on the CPU, to test this script
where there is no GPU (tests/gpu/test_dynamic_vram.py does both).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import types
from pathlib import Path

TESTS_DIR = Path(__file__).resolve().parents[1]
REPO_ROOT = TESTS_DIR.parent
NOT_APPLICABLE = 3
TOLERANCE = 1e-3  # relative; GPU kernels (attention, convolutions) differ between the two models' paths
RANK, MIN_RANK = 8, 4


def start_comfy(comfyui: Path, on_cpu: bool) -> str:
    """Import ComfyUI on the CPU ("cpu") or with dynamic VRAM on, in main.py's order ("dynamic"); "no cuda"
    or "dynamic vram off" when it cannot start here."""
    sys.path[:0] = [str(comfyui), str(TESTS_DIR)]
    import comfy.options  # noqa: F401  (args_parsing stays False: cli_args parses [])
    from comfy.cli_args import args, enables_dynamic_vram

    args.cpu = on_cpu
    args.use_pytorch_cross_attention = True
    if on_cpu:
        return "cpu"
    import comfy_aimdo.control
    if not enables_dynamic_vram():
        return "dynamic vram off"
    try:  # as main.py: before torch is imported
        comfy_aimdo.control.init(simple_vram_headroom=None, nvml_pressure=not args.disable_nvml_pressure)
    except TypeError:
        comfy_aimdo.control.init()
    import torch
    if not torch.cuda.is_available():
        return "no cuda"
    import comfy.memory_management
    import comfy.model_management as mm
    import comfy.model_patcher
    try:
        ready = comfy_aimdo.control.init_devices((d.index, int(args.vram_headroom * 1024 ** 3))
                                                 for d in mm.get_all_torch_devices())
    except TypeError:
        ready = comfy_aimdo.control.init_devices(d.index for d in mm.get_all_torch_devices())
    if not ready:
        return "dynamic vram off"
    comfy.model_patcher.CoreModelPatcher = comfy.model_patcher.ModelPatcherDynamic
    comfy.memory_management.aimdo_enabled = True
    return "dynamic"


def relative(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def make_tlora(patcher, seed: int):
    """A T-LoRA on the attention projections, moved away from its initialisation so that dW != 0."""
    import torch

    from tlora_pack.tlora_core.config import TLoraConfig
    from tlora_pack.tlora_core.format import TLora
    from tlora_pack.trainer.settings import TrainSettings
    from tlora_pack.trainer.train import find_target_layers, new_factors

    layers = find_target_layers(patcher.model, "attention")
    factors = new_factors(layers, TrainSettings(rank=RANK, min_rank=MIN_RANK, seed=seed), True, torch.device("cpu"))
    gen = torch.Generator().manual_seed(seed + 100)
    for f in factors.values():
        f.down = f.down + 0.05 * torch.randn(f.down.shape, generator=gen)
        f.up = f.up + 0.05 * torch.randn(f.up.shape, generator=gen)
    return TLora(TLoraConfig(rank=RANK, min_rank=MIN_RANK, base_model="SD15"), factors)


def dense_delta(f, keep: int):
    """Eq. 6 by hand for a prefix mask keeping `keep` components."""
    def part(down, up, scale):
        g = up.new_ones(down.shape[0]) if scale is None else scale.clone()
        g[keep:] = 0
        return (up * g) @ down
    dw = part(f.down, f.up, f.scale)
    return dw - part(f.base_down, f.base_up, f.base_scale) if f.base_down is not None else dw


def paper_rank(t: int, rank: int = RANK, min_rank: int = MIN_RANK) -> int:
    """r(t) of Eq. 5 with alpha 1, written out."""
    return (rank - min_rank) * (1000 - t) // 1000 + min_rank


def dense_reference(base_state: dict, deltas: dict):
    """A plain (non-dynamic) fp32 model that ComfyUI builds from W + dW."""
    import inspect

    import torch

    import comfy.sd

    state = {f"model.diffusion_model.{k}": v.to(torch.float32, copy=True) for k, v in base_state.items()}
    for key, dw in deltas.items():
        state[f"model.{key}.weight"] = state[f"model.{key}.weight"] + dw.float().cpu()
    extra = {"disable_dynamic": True} if "disable_dynamic" in inspect.signature(
        comfy.sd.load_state_dict_guess_config).parameters else {}
    reference, _, _, _ = comfy.sd.load_state_dict_guess_config(
        state, output_vae=False, output_clip=False, model_options={"dtype": torch.float32}, **extra)
    return reference


class Checks:
    def __init__(self):
        self.failed = []

    def expect(self, ok: bool, what: str):
        print(("ok    " if ok else "FAIL  ") + what, flush=True)
        if not ok:
            self.failed.append(what)


def weight_function_calls():
    """Counts the pack's weight_function calls (the sampling path that adds dW on the weight)."""
    from tlora_pack.trainer import runtime as rt

    counter = types.SimpleNamespace(n=0)
    real = rt.SharedWeightFunction.__call__

    def counted(self, weight):
        counter.n += 1
        return real(self, weight)
    rt.SharedWeightFunction.__call__ = counted
    return counter


def run_checks(dynamic: bool, workdir: Path) -> Checks:
    import torch

    import comfy.model_management as mm
    import comfy.sd
    from support.predict import predict_x0
    from support.tiny_model import build_tiny_sd15_checkpoint
    from tlora_pack.trainer.runtime import apply_tlora
    from tlora_pack.trainer.settings import TrainSettings
    from tlora_pack.trainer.train import train_tlora

    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    checks = Checks()
    ckpt = workdir / "tiny_sd15.safetensors"
    build_tiny_sd15_checkpoint(ckpt, seed=0)
    patcher, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(
        str(ckpt), model_options={"dtype": torch.float32}, te_model_options={"dtype": torch.float32})
    checks.expect(patcher.is_dynamic() == dynamic if hasattr(patcher, "is_dynamic") else not dynamic,
                  f"the model loads {'through ModelPatcherDynamic' if dynamic else 'with a plain ModelPatcher'}")
    base_state = {k: v.detach().cpu().clone() for k, v in patcher.model.diffusion_model.state_dict().items()}
    positive = clip.encode_from_tokens_scheduled(clip.tokenize("a photo of sks dog"))
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    sigmas = patcher.model.model_sampling.sigmas
    calls = weight_function_calls()

    # 1, 2: Apply at several t, then again after an unload (the next load rebuilds weight_function lists).
    tlora = make_tlora(patcher, seed=0)
    patched, _ = apply_tlora(patcher, tlora, 0.8)
    for round_ in ("first load", "after unload and reload"):
        for t in (999, 500, 0):
            sigma = float(sigmas[t])
            calls.n = 0
            got = predict_x0(patched, positive, x, sigma)
            want = predict_x0(dense_reference(base_state, {k: 0.8 * dense_delta(f, paper_rank(t))
                                                           for k, f in tlora.layers.items()}), positive, x, sigma)
            base = predict_x0(patcher, positive, x, sigma)
            checks.expect(relative(want, base) > 1e-3 and relative(got, want) < TOLERANCE and calls.n > 0,
                          f"Apply at t={t} ({round_}): |got - (W + dW)| / |W + dW| = {relative(got, want):.2e}, "
                          f"weight_function called {calls.n} times")
        mm.unload_all_models()

    # 3: stacked with a stock LoRA on one adapted layer.
    key = next(iter(tlora.layers))
    weight = base_state[key.removeprefix("diffusion_model.") + ".weight"]
    gen = torch.Generator().manual_seed(5)
    up = 0.05 * torch.randn(weight.shape[0], 2, generator=gen)
    down = 0.05 * torch.randn(2, weight.shape[1], generator=gen)
    lora = {f"{key}.lora_up.weight": up, f"{key}.lora_down.weight": down, f"{key}.alpha": torch.tensor(2.0)}
    both, _ = apply_tlora(comfy.sd.load_lora_for_models(patcher, None, lora, 1.0, 0.0)[0], tlora, 1.0)
    t = 300
    deltas = {k: dense_delta(f, paper_rank(t)) for k, f in tlora.layers.items()}
    deltas[key] = deltas[key] + up @ down
    got = predict_x0(both, positive, x, float(sigmas[t]))
    want = predict_x0(dense_reference(base_state, deltas), positive, x, float(sigmas[t]))
    checks.expect(relative(got, want) < TOLERANCE, f"with a stock LoRA at t={t}: {relative(got, want):.2e}")
    mm.unload_all_models()

    # 4: training on this patcher = training on a plain one; the trained T-LoRA gives W + dW(t).
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 64), torch.linspace(-1, 1, 64), indexing="ij")
    disc = ((xx ** 2 + yy ** 2) < 0.3).float()
    image = torch.stack([0.2 + 0.7 * disc, 0.4 + 0.0 * disc, 0.8 - 0.6 * disc], dim=-1).unsqueeze(0)
    settings = TrainSettings(rank=4, min_rank=2, steps=3, learning_rate=1e-3, seed=0, resolution=64,
                             prompt="a photo of sks dog")
    trained = train_tlora(patcher, clip, vae, image, None, settings, str(workdir / "loras"), "t/dynamic")
    mm.unload_all_models()
    plain_patcher = patcher.clone(disable_dynamic=True) if dynamic else patcher
    plain = train_tlora(plain_patcher, clip, vae, image, None, settings, str(workdir / "loras"), "t/plain")
    mm.unload_all_models()
    same = all(abs(a - b) <= TOLERANCE * max(abs(b), 1e-6) for a, b in zip(trained.losses, plain.losses))
    shown = [[f"{v:.6f}" for v in run.losses] for run in (trained, plain)]
    checks.expect(same and len(trained.losses) == 3, f"training losses {shown[0]} == plain {shown[1]}")
    t = 600
    got = predict_x0(apply_tlora(patcher, trained.tlora, 1.0)[0], positive, x, float(sigmas[t]))
    want = predict_x0(dense_reference(base_state, {k: dense_delta(f, paper_rank(t, 4, 2))
                                                   for k, f in trained.tlora.layers.items()}),
                      positive, x, float(sigmas[t]))
    checks.expect(relative(got, want) < TOLERANCE, f"trained T-LoRA at t={t}: {relative(got, want):.2e}")
    return checks


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-dry-run", action="store_true",
                        help="run the checks with the plain ModelPatcher on the CPU (tests this script)")
    cli = parser.parse_args(argv)
    comfyui = Path(os.environ.get("TLORA_COMFYUI_DIR") or REPO_ROOT / ".deps" / "ComfyUI").resolve()
    if not cli.cpu_dry_run and not (comfyui / "comfy" / "memory_management.py").is_file():
        print(f"not applicable: the ComfyUI at {comfyui} has no dynamic VRAM (comfy/memory_management.py)")
        return NOT_APPLICABLE
    state = start_comfy(comfyui, on_cpu=cli.cpu_dry_run)
    if state == "no cuda":
        print("not applicable: no CUDA device")
        return NOT_APPLICABLE
    if state == "dynamic vram off":
        print("FAIL  dynamic VRAM did not start (comfy-aimdo init_devices failed, or it is disabled)")
        return 1
    dynamic = state == "dynamic"
    _pack = types.ModuleType("tlora_pack")
    _pack.__path__ = [str(REPO_ROOT)]
    sys.modules.setdefault("tlora_pack", _pack)
    with tempfile.TemporaryDirectory(prefix="tlora-dynamic-vram-") as tmp:
        checks = run_checks(dynamic, Path(tmp))
    print(f"{'dynamic VRAM' if dynamic else 'CPU dry run'}: "
          f"{'all checks hold' if not checks.failed else f'{len(checks.failed)} failed'}")
    return 1 if checks.failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""Sampling-step time and peak memory: no LoRA, a standard LoRA (LoraLoader), Apply T-LoRA.

Two models, random weights, built and detected by ComfyUI itself (see Setup):
  --model sd15  the full SD1.5 UNet (ComfyUI's SD15 config: model_channels 320, channel_mult
                [1, 2, 4, 4], 2 res blocks, transformer depth 1, context 768; 859.5 M parameters),
                sampled as KSampler does (`comfy.sample.sample`, euler, CFG 7: every model call is a
                batch of 2 rows, cond and uncond); adapted: to_q/k/v/out of attn1 and attn2 of all 16
                transformer blocks (128 Linears);
  --model flux  a Flux-shaped DiT: Flux.1-dev's widths (hidden 3072, 24 heads) with fewer blocks
                (--flux-blocks), euler, CFG 1; adapted: the layers named by ComfyUI's Flux LoRA key map
                (q/k/v row slices of the fused qkv and linear1 weights, output projections).
Variants:
  none   the bare model;
  lora   a rank-64 LoRA on the same layers, loaded by `comfy.sd.load_lora_for_models` (what LoraLoader
         does: merged into the weights when the model loads, in the untimed first step); the report
         checks it was merged at load and that its step equals the bare model's within 5 %;
  tlora  Apply T-LoRA (rank 64, r_min 32, variant tlora) on the same layers.
Peak memory: each variant alone in a child process (same seeds), so one variant's freed memory
cannot hide or inflate another's; CPU: peak RSS (psutil, sampled every 2 ms in a thread) minus the
RSS before the adapter is built; CUDA: torch.cuda.max_memory_allocated minus the allocation then.
Step time: all variants in ONE child, interleaved round by round (reversed every other round) on one
shared base model, so that other load on the machine falls on every variant alike; a step is the gap between KSampler
callbacks, the first step of every run (loading, patching) is left out; median and best are shown.
--profile adds where T-LoRA's extra time goes (torch.profiler with labels on the pack's functions)
and the host cost of one adapted layer's weight function.

    .venv/bin/python benchmarks/sampling_step.py             # CPU: 32x32 latent (256 px)
    .venv/bin/python benchmarks/sampling_step.py --latent 64 # 512 px
    .venv/bin/python benchmarks/sampling_step.py --model flux --flux-blocks 2,2
    .venv/bin/python benchmarks/sampling_step.py --profile
CUDA (when present): fp16 SD1.5 / bf16 DiT, 64x64 latent (512 px) unless --latent is given.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import time
import types
from dataclasses import dataclass
from pathlib import Path

import torch

from memory_counts import AllocatorPeak  # benchmarks/ is on sys.path when a script here runs

ROOT = Path(__file__).resolve().parents[1]
RESULT_TAG = "BENCH_RESULT "
RANK, MIN_RANK = 64, 32

# ComfyUI's SD15 UNet (what model_detection reports for an SD1.5 checkpoint).
SD15_UNET = dict(image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[2, 2, 2, 2],
                 channel_mult=[1, 2, 4, 4], transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
                 transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], transformer_depth_middle=1,
                 use_linear_in_transformer=False, context_dim=768, num_heads=8, num_head_channels=-1,
                 use_spatial_transformer=True, legacy=False, adm_in_channels=None, use_checkpoint=False,
                 use_temporal_resblock=False, use_temporal_attention=False)


def setup_pack():
    """The repo root as the package `tlora_pack` (its __init__ not run) and ComfyUI on the CPU or CUDA."""
    if "tlora_pack" not in sys.modules:
        pack = types.ModuleType("tlora_pack")
        pack.__path__ = [str(ROOT)]
        sys.modules["tlora_pack"] = pack
    tests = str(ROOT / "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    from support.comfy_env import setup_comfy
    args = setup_comfy()
    if torch.cuda.is_available() and os.environ.get("BENCH_DEVICE", "auto") != "cpu":
        args.cpu = False  # setup_comfy forces the CPU for the tests; the benchmark uses the GPU when there is one
    import comfy.model_management  # noqa: F401  (reads the flags now)


def device_kind() -> str:
    import comfy.model_management as mm
    return mm.get_torch_device().type


def package_version(name: str) -> str:
    from importlib import metadata
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def environment() -> str:
    """Versions (torch, ComfyUI, diffusers, peft) and the machine, for the head of every report."""
    import platform

    import psutil
    from support.comfy_env import comfyui_dir
    try:
        import comfyui_version
        comfy_version = comfyui_version.__version__
    except ImportError:
        comfy_version = "unknown"
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return (f"torch {torch.__version__}, ComfyUI {comfy_version} ({comfyui_dir()}), diffusers "
            f"{package_version('diffusers')}, peft {package_version('peft')}, python {platform.python_version()}\n"
            f"machine: {platform.system()} {platform.machine()}, CPU {cpu}, {os.cpu_count()} logical cores, "
            f"torch threads {torch.get_num_threads()}, RAM {psutil.virtual_memory().total / 2 ** 30:.0f} GiB, "
            f"GPU {gpu}; compute device {device_kind()}; load average {load_average()}")


# ---------------------------------------------------------------- model

def random_state_dict(model: torch.nn.Module, seed: int = 0) -> dict:
    """Random weights for a (meta-device) model: matrices/kernels ~ N(0, 1/fan_in), norms identity
    (GroupNorm, LayerNorm, and the `scale` of RMS norms), other vectors small."""
    norms = {f"{n}.{p}" if n else p: p for n, m in model.named_modules()
             if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm)) for p, _ in m.named_parameters(recurse=False)}
    norms.update({n: "weight" for n, _ in model.named_parameters() if n.endswith(".scale")})
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for name, param in sorted(model.named_parameters()):
        shape = tuple(param.shape)
        if name in norms:
            sd[name] = torch.ones(shape) if norms[name] == "weight" else torch.zeros(shape)
        elif len(shape) >= 2:
            sd[name] = torch.randn(shape, generator=gen).div_(math.sqrt(math.prod(shape[1:])))
        else:
            sd[name] = torch.randn(shape, generator=gen).mul_(0.02)
    return sd


def build_sd15_unet(dtype: torch.dtype, seed: int = 0):
    """A ModelPatcher of the full-size SD15 UNet, detected and built by ComfyUI itself."""
    import comfy.sd
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    with torch.device("meta"):
        unet = UNetModel(**SD15_UNET, dtype=torch.float32, operations=comfy.ops.disable_weight_init)
    patcher = comfy.sd.load_diffusion_model_state_dict(random_state_dict(unet, seed), model_options={"dtype": dtype})
    if patcher is None or type(patcher.model.model_config).__name__ != "SD15":
        raise RuntimeError("ComfyUI did not detect the random UNet as SD15")
    gc.collect()
    return patcher


def flux_config(double: int, single: int) -> dict:
    """Flux.1-dev's transformer at its real widths (hidden 3072, 24 heads, MLP 4x, T5 context 4096,
    CLIP pooled 768, guidance embedding) with `double` double-stream and `single` single-stream blocks
    (the real model has 19 and 38)."""
    return dict(in_channels=16, out_channels=16, vec_in_dim=768, context_in_dim=4096, hidden_size=3072,
                mlp_ratio=4.0, num_heads=24, depth=double, depth_single_blocks=single, axes_dim=[16, 56, 56],
                theta=10000, patch_size=2, qkv_bias=True, guidance_embed=True)


def build_flux(dtype: torch.dtype, double: int, single: int, seed: int = 0):
    """A ModelPatcher of a Flux-shaped DiT (flux_config) with random weights, detected and built by ComfyUI."""
    import comfy.ops
    import comfy.sd
    from comfy.ldm.flux.model import Flux
    with torch.device("meta"):
        model = Flux(**flux_config(double, single), dtype=torch.float32, operations=comfy.ops.disable_weight_init)
    patcher = comfy.sd.load_diffusion_model_state_dict(random_state_dict(model, seed), model_options={"dtype": dtype})
    if patcher is None or type(patcher.model.model_config).__name__ != "Flux":
        raise RuntimeError("ComfyUI did not detect the random DiT as Flux")
    gc.collect()
    return patcher


def flux_layer_keys(double: int, single: int) -> list[str]:
    """The Flux T-LoRA's layer keys, named as ComfyUI's Flux LoRA key map names them (diffusers names):
    q, k, v and output projections of both streams of every double block (the reference code's FLUX
    targets) and q, k, v of every single block. q/k/v are row slices of the fused qkv / linear1 weights."""
    keys = [f"transformer.transformer_blocks.{i}.attn.{p}" for i in range(double)
            for p in ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")]
    return keys + [f"transformer.single_transformer_blocks.{i}.attn.{p}" for i in range(single)
                   for p in ("to_q", "to_k", "to_v")]


def target_shapes(patcher, family: str, flux_blocks: tuple[int, int] = (0, 0)) -> dict[str, tuple[int, int]]:
    """{layer key: (out, in)} of the adapted layers. SD1.5: the 128 attention projections, keyed
    `diffusion_model.<path>` (the trainer's own finder). Flux: flux_layer_keys resolved through
    ComfyUI's LoRA key map (trainer.runtime.resolve_targets), fused slices as their rows."""
    if family == "sd15":
        from tlora_pack.trainer.train import find_target_layers
        return {k: (site.out_features, site.in_features) for k, site in
                find_target_layers(patcher.model, "attention").items()}
    from tlora_pack.trainer.runtime import resolve_targets
    found, missing = resolve_targets(patcher.model, flux_layer_keys(*flux_blocks))
    if missing:
        raise RuntimeError(f"ComfyUI's Flux LoRA key map resolves no layer for {missing[:3]}")
    shapes = {}
    for key, target in found.items():
        weight = patcher.model.get_submodule(target.module_path).weight
        shapes[key] = (target.rows[1] if target.rows else weight.shape[0], weight.shape[1])
    return shapes


def random_tlora(shapes: dict, base_model: str, seed: int = 1):
    """A rank-64 T-LoRA (variant tlora, with frozen base factors) whose dW is not zero."""
    from tlora_pack.tlora_core.adapter import LayerFactors
    from tlora_pack.tlora_core.config import TLoraConfig
    from tlora_pack.tlora_core.format import TLora
    gen = torch.Generator().manual_seed(seed)

    def factors(out_f, in_f):
        rnd = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
        return LayerFactors(down=rnd(RANK, in_f) / math.sqrt(in_f), up=rnd(out_f, RANK) * 0.01,
                            scale=rnd(RANK).abs(), base_down=rnd(RANK, in_f) / math.sqrt(in_f),
                            base_up=rnd(out_f, RANK) * 0.01, base_scale=rnd(RANK).abs())
    config = TLoraConfig(rank=RANK, min_rank=MIN_RANK, variant="tlora", base_model=base_model, source="benchmark")
    return TLora(config, {k: factors(*shape) for k, shape in shapes.items()})


def random_lora(shapes: dict, seed: int = 1) -> dict:
    """A standard kohya-style rank-64 LoRA on the same layers (alpha = rank, so scale 1)."""
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for key, (out_f, in_f) in shapes.items():
        sd[f"{key}.lora_down.weight"] = torch.randn(RANK, in_f, generator=gen) / math.sqrt(in_f)
        sd[f"{key}.lora_up.weight"] = torch.randn(out_f, RANK, generator=gen) * 0.01
        sd[f"{key}.alpha"] = torch.tensor(float(RANK))
    return sd


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


# ---------------------------------------------------------------- measuring

@dataclass
class Setup:
    """What differs between the two model families of this benchmark, in one place."""

    family: str = "sd15"  # sd15 | flux
    flux_blocks: tuple[int, int] = (2, 2)  # double-stream, single-stream blocks of the Flux-shaped DiT
    flux_tokens: int = 256  # T5 tokens (ComfyUI pads Flux prompts to 256)

    @property
    def base_model(self) -> str:
        return "SD15" if self.family == "sd15" else "Flux"

    @property
    def channels(self) -> int:
        return 4 if self.family == "sd15" else 16

    @property
    def scheduler(self) -> str:
        return "normal" if self.family == "sd15" else "simple"

    def latent_shape(self, side: int) -> tuple:
        """The shape of one side x side latent (a family whose latents carry a frame axis adds it)."""
        return (1, self.channels, side, side)

    @property
    def cfg(self) -> float:
        """SD1.5 with CFG 7 (cond + uncond: 2 rows per model call); Flux-dev with CFG 1 and its guidance
        embedding (1 row per call), as each is normally sampled."""
        return 7.0 if self.family == "sd15" else 1.0

    def build(self, device: str):
        if self.family == "sd15":
            return build_sd15_unet(torch.float16 if device == "cuda" else torch.float32)
        return build_flux(torch.bfloat16 if device == "cuda" else torch.float32, *self.flux_blocks)

    def conditioning(self, seed: int):
        gen = torch.Generator().manual_seed(seed)
        if self.family == "sd15":
            return [[torch.randn(1, 77, 768, generator=gen), {}]]
        return [[torch.randn(1, self.flux_tokens, 4096, generator=gen),
                 {"pooled_output": torch.randn(1, 768, generator=gen), "guidance": 3.5}]]

    def describe(self) -> str:
        if self.family == "sd15":
            return "full SD1.5 UNet (859.5 M), 128 attention projections adapted"
        d, n = self.flux_blocks
        return (f"Flux-shaped DiT (hidden 3072, 24 heads; {d} double + {n} single blocks of the real 19 + 38), "
                f"{8 * d + 3 * n} layers adapted (q/k/v slices of fused qkv / linear1, output projections), "
                f"{self.flux_tokens} text tokens")


def make_patchers(base, setup: Setup, variants, runtimes: dict) -> tuple[dict, dict]:
    """{variant: patcher} and {variant: adapter bytes} on one shared base model (ComfyUI clones)."""
    import comfy.sd
    from tlora_pack.trainer.runtime import apply_tlora
    shapes = target_shapes(base, setup.family, setup.flux_blocks)
    patchers, sizes = {}, {}
    for variant in variants:
        if variant == "none":
            patchers[variant], sizes[variant] = base, 0
        elif variant == "lora":
            lora = random_lora(shapes)
            patchers[variant], _ = comfy.sd.load_lora_for_models(base, None, lora, 1.0, 0.0)
            sizes[variant] = nbytes(lora.values())
        elif variant == "tlora":
            tlora = random_tlora(shapes, setup.base_model)
            patchers[variant], runtimes[variant] = apply_tlora(base, tlora, 1.0)
            sizes[variant] = nbytes(t for f in tlora.layers.values() for t in f.tensors().values())
        else:
            raise SystemExit(f"unknown variant {variant!r}: use none, lora, tlora")
    return patchers, sizes


def merged_at_load(patcher) -> dict:
    """How ComfyUI applied a standard LoRA (call while it is loaded): weights merged at load (kept in
    its backup to restore) and per-forward weight functions (low-VRAM patches, which would cost
    time every step). A LoRA as users run it on a model that fits: all merged, none per step."""
    per_step = sum(1 for m in patcher.model.modules() if getattr(m, "weight_function", None))
    return {"merged": len(getattr(patcher, "backup", {})), "per_step": per_step}


def sample_once(patcher, setup: Setup, latent: int, steps: int, device: str, seed: int = 0):
    """comfy.sample.sample as KSampler runs it (euler; SD1.5: normal schedule, CFG 7; Flux: simple, CFG 1;
    `setup`: a Setup, or anything with its latent_shape, scheduler, cfg and conditioning).

    Returns (output, wall seconds per step, process CPU seconds per step); the first entry covers
    loading / patching plus the first step, the others one step each. CPU time (all threads of this
    process) does not grow while other programs hold the cores, so it is the steadier figure on a
    shared machine.
    """
    import comfy.sample
    wall, cpu = [time.perf_counter()], [time.process_time()]

    def callback(step, x0, x, total):
        if device == "cuda":
            torch.cuda.synchronize()
        wall.append(time.perf_counter())
        cpu.append(time.process_time())
    latent_image = torch.zeros(setup.latent_shape(latent))
    noise = torch.randn(latent_image.shape, generator=torch.Generator().manual_seed(seed))
    out = comfy.sample.sample(patcher, noise, steps, setup.cfg, "euler", setup.scheduler, setup.conditioning(1),
                              setup.conditioning(2), latent_image, callback=callback, disable_pbar=True, seed=seed)
    return out, gaps(wall), gaps(cpu)


def gaps(stamps: list[float]) -> list[float]:
    return [b - a for a, b in zip(stamps, stamps[1:])]


def memory_worker(setup: Setup, variant: str, latent: int, steps: int) -> dict:
    """Peak memory of one variant, alone in this process: base model built first, then probe, adapter, sampling."""
    device = device_kind()
    base = setup.build(device)
    memory = AllocatorPeak(device).start()
    patchers, sizes = make_patchers(base, setup, [variant], {})
    out, _, _ = sample_once(patchers[variant], setup, latent, steps, device)
    peak = memory.stop()  # peak RSS on the CPU (the measure of this file's tables), the allocator's on CUDA
    return {"variant": variant, "peak_bytes": peak.get("rss", peak["allocator"]), "adapter_bytes": sizes[variant],
            "finite": bool(torch.isfinite(out).all())}


def round_order(names, round_index: int) -> list:
    """The rows in run order for one round: as given in even rounds, reversed in odd ones, so that no row
    always follows the same one (the allocator's state and the caches carry over from the row before:
    on a CPU the same T-LoRA steps measured 0.82x or 1.10x of their twin row by position alone)."""
    return list(names) if round_index % 2 == 0 else list(reversed(names))


def timing_worker(setup: Setup, variants, latent: int, steps: int, rounds: int, profile: bool) -> dict:
    """Step times of all variants in one process, interleaved round by round, so that other load on
    the machine falls on every variant alike. Times per variant: "steps" (wall s), "cpu" (process CPU s),
    "first" (wall s of each run's first step, loading included)."""
    import comfy.model_management as mm
    device = device_kind()
    base = setup.build(device)
    runtimes = {}
    patchers, _ = make_patchers(base, setup, variants, runtimes)
    times = {v: {"steps": [], "cpu": [], "first": []} for v in variants}
    lora_patching = None
    for r in range(rounds):
        for v in round_order(variants, r):
            _, wall, cpu = sample_once(patchers[v], setup, latent, steps, device)
            if v == "lora" and lora_patching is None:
                lora_patching = merged_at_load(patchers[v])  # still loaded: nothing else ran since
            times[v]["first"].append(wall[0])
            times[v]["steps"].extend(wall[1:])
            times[v]["cpu"].extend(cpu[1:])
    result = {"device": device, "latent": latent, "steps": steps, "rounds": rounds, "times": times,
              "threads": torch.get_num_threads(), "lora_patching": lora_patching, "model": setup.describe(),
              "cfg": setup.cfg}
    if profile and "tlora" in variants:
        mm.unload_all_models()
        result["profile"] = dispatch_overhead(device)
        result["profile"] += "\n" + attribution(base, setup, runtimes["tlora"].tlora, latent, device)
    return result


# ---------------------------------------------------------------- profiling (--profile)

def dispatch_overhead(device: str, calls: int = 300) -> str:
    """Per-layer host cost of the weight function when the tensors are tiny, i.e. pure op dispatch:
    what a fast GPU pays on the host for every adapted layer of every model call (SD-XL: 560 layers)."""
    from tlora_pack.tlora_core.adapter import LayerFactors
    from tlora_pack.tlora_core.config import TLoraConfig
    from tlora_pack.tlora_core.format import TLora
    from tlora_pack.trainer import runtime as rt
    dev = torch.device(device)
    f = LayerFactors(*(torch.rand(*s) for s in ((RANK, 64), (64, RANK), (RANK,), (RANK, 64), (64, RANK), (RANK,))))
    tl = TLora(TLoraConfig(rank=RANK, min_rank=MIN_RANK, base_model="SD15"), {"layer": f})
    runtime = rt.TLoraRuntime(tl, {"layer": rt.Target("layer", "layer")}, 1.0, rt.Schedule(RANK, MIN_RANK, 1.0, 1000))
    weight = torch.rand(64, 64, device=dev, dtype=torch.float16 if device == "cuda" else torch.float32)
    runtime.current = runtime.masks_for(torch.tensor([500.0, 500.0]), dev)
    out = {}
    for name, fn in (("weight function", runtime.weight_functions["layer"][0]), ("bare copy", lambda w: w.clone())):
        for _ in range(20):
            fn(weight)
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            fn(weight)
        if device == "cuda":
            torch.cuda.synchronize()
        out[name] = (time.perf_counter() - start) / calls * 1e6
    return (f"host cost per adapted layer per model call, tiny 64x64 weight (dispatch only): weight function "
            f"{out['weight function']:.0f} us, a bare copy {out['bare copy']:.0f} us; x 560 layers (SD-XL): "
            f"{out['weight function'] * 560 / 1e3:.1f} ms per model call")


def attribution(base, setup: Setup, tlora, latent, device) -> str:
    """torch.profiler over 2 steps of a fresh T-LoRA patcher, with labels on the pack's functions."""
    import comfy.model_management as mm
    from tlora_pack.trainer import runtime as rt
    from torch.profiler import ProfilerActivity, profile, record_function

    def labelled(label, fn):
        def wrapper(*a, **k):
            with record_function(label):
                return fn(*a, **k)
        return wrapper
    real_cast = mm.cast_to

    def cast_to(weight, *a, **k):
        if not k.get("copy"):
            return real_cast(weight, *a, **k)
        with record_function("comfy: weight copy before weight_function"):
            return real_cast(weight, *a, **k)
    labels = {"tlora: weight_function (all)": (rt.SharedWeightFunction, "__call__"),
              "tlora: forward_hook": (rt.AdaptedLayer, "forward_hook"),
              "tlora: stacked factors (per call, CPU)": (rt, "stacked_factors"),
              "tlora: dW x on activations": (rt, "stacked_delta"),
              "tlora: APPLY_MODEL wrapper (whole call)": (rt.TLoraRuntime, "apply_model_wrapper"),
              "tlora: mask build": (rt.TLoraRuntime, "masks_for")}
    saved = {label: getattr(obj, name) for label, (obj, name) in labels.items()}
    for label, (obj, name) in labels.items():
        setattr(obj, name, labelled(label, saved[label]))
    mm.cast_to = cast_to
    try:
        patched, _ = rt.apply_tlora(base, tlora, 1.0)
        sample_once(patched, setup, latent, 1, device)  # loads (injects) it
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
        with profile(activities=activities) as prof:
            sample_once(patched, setup, latent, 2, device)
        mm.unload_all_models()  # ejects while the labelled functions are still the ones injected
    finally:
        for label, (obj, name) in labels.items():
            setattr(obj, name, saved[label])
        mm.cast_to = real_cast
    events = {e.key: e for e in prof.key_averages()}
    calls = events["tlora: APPLY_MODEL wrapper (whole call)"].count
    whole = events["tlora: APPLY_MODEL wrapper (whole call)"].cpu_time_total / calls / 1e3
    lines = [f"where T-LoRA's time goes (torch.profiler, CPU time, per model call = batch of 2, "
             f"{calls} calls; the profiler adds its own overhead):", f"  whole model call   {whole:9.1f} ms"]
    for label in ("comfy: weight copy before weight_function", *list(labels)[:-2], "tlora: mask build"):
        if label in events:
            ms = events[label].cpu_time_total / calls / 1e3
            lines.append(f"  {label:42} {ms:9.1f} ms ({100 * ms / whole:4.1f} %), "
                         f"{events[label].count // calls} calls per model call")
    inner = [e for e in prof.key_averages() if e.key.startswith("aten::")]
    top = sorted(inner, key=lambda e: e.self_cpu_time_total, reverse=True)[:8]
    lines.append("  top aten ops (self CPU ms per model call): " + ", ".join(
        f"{e.key[6:]} {e.self_cpu_time_total / calls / 1e3:.0f}" for e in top))
    return "\n".join(lines)


# ---------------------------------------------------------------- driver

def run_child(args: list[str], script: str = __file__) -> dict:
    """Run `script` as a child with `args`; returns its result (the last tagged JSON line)."""
    proc = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_TAG)]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise SystemExit(f"child {' '.join(args)} failed (exit {proc.returncode})")
    return json.loads(lines[-1][len(RESULT_TAG):])


def load_average() -> str:
    try:
        return " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "?"


def mib(b: float) -> float:
    return b / 2 ** 20


def ratio_lines(values: dict, label: str, pairs) -> list[str]:
    return [f"time ({label}) {name + ':':24} {values[x] / values[y]:.3f}x{goal}"
            for x, y, name, goal in pairs if x in values and y in values]


def step_medians(times: dict) -> tuple[dict, dict]:
    """{variant: median wall s/step}, {variant: median CPU s/step} of a timing worker's "times"."""
    return ({v: statistics.median(x["steps"]) for v, x in times.items()},
            {v: statistics.median(x["cpu"]) for v, x in times.items()})


def report(timing: dict, memory: dict):
    t = timing["times"]
    wall, cpu = step_medians(t)
    lat = timing["latent"]
    rows = 2 if timing["cfg"] != 1.0 else 1
    print(f"\n{timing['model']}")
    print(f"device {timing['device']} ({timing['threads']} threads), latent {lat}x{lat} ({lat * 8} px), {rows} row(s) "
          f"per model call (CFG {timing['cfg']:g}), euler; {timing['rounds']} rounds x {timing['steps']} steps per "
          f"variant, interleaved; the first step of each run is not timed")
    print(f"{'variant':8} {'wall s/step':>11} {'(min':>6} {'max)':>6} {'CPU s/step':>10} {'n':>3} {'1st step s':>10} "
          f"{'peak MiB':>9} {'adapter MiB':>11} finite")
    for v, x in t.items():
        m = memory.get(v, {})
        print(f"{v:8} {wall[v]:11.3f} {min(x['steps']):6.2f} {max(x['steps']):6.2f} {cpu[v]:10.3f} "
              f"{len(x['steps']):3d} {statistics.median(x['first']):10.2f} {mib(m.get('peak_bytes', 0)):9.1f} "
              f"{mib(m.get('adapter_bytes', 0)):11.1f} {m.get('finite', '?')}")
    pairs = [("tlora", "none", "T-LoRA / bare", "  (goal <= 1.05x)"),
             ("tlora", "lora", "T-LoRA / standard LoRA", "  (goal <= 1.05x)"),
             ("lora", "none", "standard LoRA / bare", "  (check: within 0.95-1.05x)")]
    for line in ratio_lines(wall, "wall, median", pairs) + ratio_lines(cpu, "CPU,  median", pairs):
        print(line)
    patching = timing.get("lora_patching")
    if patching is not None and "none" in wall:
        within = all(0.95 <= v["lora"] / v["none"] <= 1.05 for v in (wall, cpu))
        print(f"standard LoRA baseline: {patching['merged']} weights merged at load, {patching['per_step']} "
              f"per-step weight functions; step time equals the bare model's within 5 % (wall and CPU): "
              f"{'yes' if within else 'NO: the baseline is noisy or pays a per-step cost; do not quote its ratio'}")
    for v, note in (("tlora", "  (goal: <= the adapter's tensors)"), ("lora", "  (+ ComfyUI's backup of patched weights)")):
        if v in memory and "none" in memory:
            over = memory[v]["peak_bytes"] - memory["none"]["peak_bytes"]
            print(f"memory {v} peak - none peak: {mib(over):7.1f} MiB; adapter tensors "
                  f"{mib(memory[v]['adapter_bytes']):6.1f} MiB{note}")
    if timing.get("profile"):
        print("\n" + timing["profile"])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=("sd15", "flux"), default="sd15",
                        help="sd15: the full SD1.5 UNet; flux: a Flux-shaped DiT (see --flux-blocks)")
    parser.add_argument("--flux-blocks", default="2,2", help="double,single blocks of the Flux-shaped DiT")
    parser.add_argument("--flux-tokens", type=int, default=256, help="text tokens of the Flux conditioning")
    parser.add_argument("--variants", default="none,lora,tlora")
    parser.add_argument("--latent", type=int, default=0, help="latent side; 0: 32 on the CPU, 64 on CUDA")
    parser.add_argument("--steps", type=int, default=4, help="sampling steps per run (the first is not timed)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds over the variants")
    parser.add_argument("--memory-steps", type=int, default=3, help="steps of each memory run (0: no memory runs)")
    parser.add_argument("--profile", action="store_true",
                        help="also break down where T-LoRA's extra time goes (needs the lora and tlora variants)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    variants = args.variants.split(",")
    double, single = (int(n) for n in args.flux_blocks.split(","))
    setup = Setup(args.model, (double, single), args.flux_tokens)
    setup_pack()
    if args.worker:
        if args.threads:
            torch.set_num_threads(args.threads)
        latent = args.latent or (64 if device_kind() == "cuda" else 32)
        if args.worker == "timing":
            out = timing_worker(setup, variants, latent, args.steps, args.rounds, args.profile)
        else:
            out = memory_worker(setup, args.worker, latent, args.memory_steps)
        print(RESULT_TAG + json.dumps(out), flush=True)
        return
    start = time.perf_counter()
    print(environment(), flush=True)
    common = ["--model", args.model, "--flux-blocks", args.flux_blocks, "--flux-tokens", str(args.flux_tokens),
              "--latent", str(args.latent), "--steps", str(args.steps), "--rounds", str(args.rounds),
              "--memory-steps", str(args.memory_steps), "--variants", args.variants, "--threads", str(args.threads)]
    memory = {}
    for v in variants if args.memory_steps else []:
        print(f"-- memory run: {v}", flush=True)
        memory[v] = run_child(["--worker", v, *common])
    print("-- timing run: " + ", ".join(variants) + (" + profile" if args.profile else ""), flush=True)
    timing = run_child(["--worker", "timing", *common, *(["--profile"] if args.profile else [])])
    report(timing, memory)
    print(f"\nload average at end: {load_average()}; total wall time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()

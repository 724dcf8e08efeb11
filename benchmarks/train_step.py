"""Training-step time and peak memory: this pack's trainer beside diffusers + peft and ComfyUI's TrainLoraNode.

Trainers on the same full-size SD1.5-architecture UNet (859.5 M parameters, random weights, fp32 on
the CPU, bf16 autocast on CUDA), rank 64, batch 1, 256 px (32x32 latent) unless --resolution, AdamW
lr 1e-4, betas (0.9, 0.999), weight decay 1e-4, eps 1e-8. What each row adapts:
  peft      diffusers UNet2DConditionModel with SD1.5's config + peft LoRA (r = alpha = 64, gaussian
            init as diffusers' train_dreambooth_lora.py) on to_q, to_k, to_v, to_out.0 of every
            attention (128 Linears), epsilon-MSE loss: the like-for-like baseline of `lora` and `tlora`.
  lora      this pack's trainer, variant "lora" (plain LoRA), the same 128 attention projections.
  tlora     this pack's trainer, variant "tlora" (Ortho-LoRA, frozen base copies, rank mask), same layers.
  tlora_preview  as tlora, with a preview image (the SD family's: 12 Euler steps, CFG 5) after every 2nd step; its steps
            are timed without the previews, each preview apart: preview time / training time.
  tlora_ff  this pack's trainer, T-LoRA on attention + feed-forward Linears (160 Linears): the row to
            set beside `native`, which cannot be restricted to fewer layers.
  native    comfy_extras/nodes_train.py TrainLoraNode (algorithm LoRA): an adapter on EVERY weight of 2+
            dimensions (Linears and convolutions) plus trained diffs on all 1-D weights and biases.
            Fed a LIST of two latents, as its dataset nodes produce (a single latent batch crashes
            0.3.75 with UnboundLocalError 'multi_res'); batch_size 1 still trains on one latent per
            step. training_dtype and lora_dtype fp32 on the CPU (bf16 is ~10x slower there).
Gradient checkpointing is the same for all (--gradient-checkpointing; TrainLoraNode's own default is
on, the pack's and diffusers' off). The Ortho-LoRA SVD init is swapped for random factors of the same
shapes unless --real-init (setup only, never inside a timed step). CLIP and VAE are the tiny test
ones (tests/support/tiny_model.py; they run once, to encode); peft gets latents and text embeddings
of the same shapes.
Step time: all trainers in ONE child, interleaved round by round (reversed order every other round),
the first step of every run (warm-up) left out; wall time and process CPU time (steadier on a shared machine). Memory:
each trainer alone in a child process, measured two ways (memory_counts.py): the bytes autograd saves
for backward (exact, by kind) and the allocator's peak above the baseline once the base model is built
(CUDA's count; on the CPU glibc's bytes in use, with peak RSS beside it). Then an estimate of the paper's SD-XL recipe (1024 px,
rank 64, 800 steps, batch 1) on one A100-class GPU, from FLOPs and saved activations counted on the
meta device (see sdxl_estimate).

    .venv/bin/python benchmarks/train_step.py                          # peft, lora, tlora
    .venv/bin/python benchmarks/train_step.py --trainers native,tlora_ff
    .venv/bin/python benchmarks/train_step.py --trainers tlora,tlora_preview --no-estimate   # preview cost
    .venv/bin/python benchmarks/train_step.py --gradient-checkpointing on
    .venv/bin/python benchmarks/train_step.py --estimate-only
    .venv/bin/python benchmarks/train_step.py --trainers peft,lora,tlora --memory-only --no-estimate
Needs benchmarks/requirements.txt (diffusers, peft) for the peft row.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sampling_step as common  # noqa: E402  (model build, memory probe, child runner)
from memory_counts import AllocatorPeak, SavedTensors, extra_bytes  # noqa: E402

RANK, MIN_RANK = common.RANK, common.MIN_RANK
LR, PROMPT = 1e-4, "a photo of sks dog"


def train_dtype() -> str:
    """fp32 on a CPU (bf16 there is ~10x slower), bf16 autocast on CUDA, for every trainer alike."""
    return "bf16" if common.device_kind() == "cuda" else "fp32"


def synthetic_image(size: int) -> torch.Tensor:
    """[1, size, size, 3] in 0..1: a warm disc on a blue-green gradient."""
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    img = torch.stack([0.15 + 0.2 * xx, 0.35 + 0.3 * yy, 0.6 - 0.2 * xx], dim=-1)
    disc = ((xx - 0.4) ** 2 + (yy - 0.45) ** 2) < 0.22 ** 2
    img[disc] = torch.tensor([0.95, 0.55, 0.15])
    return img.unsqueeze(0)


def _sync():
    if torch.cuda.is_available() and common.device_kind() == "cuda":
        torch.cuda.synchronize()


class Stamps:
    """Wall and process-CPU time stamps at the end of every step; gaps() gives one entry per step.

    preview() (the trainer's show_preview, called when a preview made after the latest step is ready)
    records that preview's time apart and leaves it out of the next step's gap."""

    def __init__(self):
        self.wall, self.cpu, self.previews = [], [], []
        self.paused_wall, self.paused_cpu = [], []  # per stamp: preview time that followed it

    def __call__(self, *_):
        _sync()
        self.wall.append(time.perf_counter())
        self.cpu.append(time.process_time())
        self.paused_wall.append(0.0)
        self.paused_cpu.append(0.0)

    def preview(self, *_):
        _sync()
        wall, cpu = time.perf_counter() - self.wall[-1], time.process_time() - self.cpu[-1]
        self.previews.append(wall)
        self.paused_wall[-1], self.paused_cpu[-1] = wall, cpu

    def gaps(self):
        return ([g - p for g, p in zip(common.gaps(self.wall), self.paused_wall)],
                [g - p for g, p in zip(common.gaps(self.cpu), self.paused_cpu)])


def run_native(base, latent, positive, steps: int, checkpointing: bool):
    """TrainLoraNode.execute called as ComfyUI calls it (is_input_list: every input is a list).

    Returns (wall gaps, cpu gaps, adapter bytes). Steps are stamped at every fwd_bwd start and once
    at the end, so the gaps cover forward, backward and the optimiser step of each step.
    """
    from comfy_extras import nodes_train
    stamps, real = Stamps(), nodes_train.TrainSampler.fwd_bwd

    def stamped(self, *a, **k):
        stamps()
        return real(self, *a, **k)
    nodes_train.TrainSampler.fwd_bwd = stamped
    try:
        out = nodes_train.TrainLoraNode.execute(
            model=[base], latents=[{"samples": latent}, {"samples": latent.clone()}], positive=[positive],
            batch_size=[1], grad_accumulation_steps=[1], steps=[steps], learning_rate=[LR], rank=[RANK],
            optimizer=["AdamW"], loss_function=["MSE"], seed=[0], training_dtype=[train_dtype()], lora_dtype=["fp32"],
            algorithm=["LoRA"], gradient_checkpointing=[checkpointing], existing_lora=["[None]"])
        stamps()
    finally:
        nodes_train.TrainSampler.fwd_bwd = real
    lora_sd = out.args[1]
    wall, cpu = stamps.gaps()
    return wall, cpu, common.nbytes(lora_sd.values()), []


def fast_ortho_init():
    """Swap the Ortho-LoRA init (a float64 SVD per layer: minutes for 128 layers on 2 cores) for random
    factors of the same shapes with the same frozen copies. A step's cost does not depend on the
    values; --real-init keeps the SVD (its time is not part of any step either way)."""
    from tlora_pack.tlora_core import init
    from tlora_pack.tlora_core.adapter import LayerFactors

    def random_ortho(in_features, out_features, rank, *_, **__):
        gen = torch.Generator().manual_seed(in_features * 7 + out_features)
        down = torch.randn(rank, in_features, generator=gen) / in_features ** 0.5
        up = torch.randn(out_features, rank, generator=gen) / out_features ** 0.5
        scale = torch.rand(rank, generator=gen)
        return LayerFactors(down=down, up=up, scale=scale, base_down=down.clone(), base_up=up.clone(),
                            base_scale=scale.clone())
    init.ortho_factors = random_ortho


PREVIEW_EVERY = 2  # the tlora_preview row: a preview after every 2nd step, at the SD1.x family's preview recipe


def sd_preview():
    """The SD1.x family's preview recipe (steps, CFG) from the family table."""
    from tlora_pack.tlora_core.families import family_named
    return family_named("SD1.x").recipe.preview


def run_pack(base, clip, vae, image, variant: str, targets: str, steps: int, checkpointing: bool, folder: str,
             previews: bool = False):
    """train_tlora with the paper's settings at rank 64; returns (wall gaps, cpu gaps, adapter bytes,
    wall seconds of each preview)."""
    from tlora_pack.trainer.preview import PreviewSettings
    from tlora_pack.trainer.settings import TrainSettings
    from tlora_pack.trainer.train import train_tlora
    settings = TrainSettings(variant=variant, rank=RANK, min_rank=MIN_RANK, steps=steps, learning_rate=LR,
                             resolution=image.shape[1], gradient_checkpointing=checkpointing, targets=targets,
                             training_dtype=train_dtype(), prompt=PROMPT)
    recipe = sd_preview()
    look = PreviewSettings(every=PREVIEW_EVERY if previews else 0, steps=recipe.steps, cfg=recipe.cfg,
                           prompt=PROMPT + " on the beach")
    stamps = Stamps()
    result = train_tlora(base, clip, vae, image, None, settings, folder, f"bench/{variant}", progress=stamps,
                         previews=look, show_preview=stamps.preview)
    wall, cpu = stamps.gaps()  # stamps at the END of each step: step 0 has no gap, which drops the warm-up
    return [None] + wall, [None] + cpu, result.tlora.num_values() * 4, stamps.previews  # fp32 while training


# diffusers' UNet2DConditionModel config of SD1.5 (its unet/config.json) and of the tiny test UNet
SD15_DIFFUSERS = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                      block_out_channels=(320, 640, 1280, 1280),
                      down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                      up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=768,
                      attention_head_dim=8, norm_num_groups=32, norm_eps=1e-5, act_fn="silu", flip_sin_to_cos=True,
                      freq_shift=0, downsample_padding=1, mid_block_scale_factor=1, center_input_sample=False)
TINY_DIFFUSERS = {**SD15_DIFFUSERS, "layers_per_block": 1, "block_out_channels": (320,),
                  "down_block_types": ("CrossAttnDownBlock2D",), "up_block_types": ("CrossAttnUpBlock2D",)}
PEFT_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
# (layer counts: the full SD1.5 UNet)
ADAPTS = {"peft": "diffusers + peft LoRA: to_q/k/v/out.0 of every attention (128 Linears)",
          "lora": "this trainer, plain LoRA: the same attention projections",
          "tlora": "this trainer, T-LoRA: the same attention projections",
          "tlora_preview": "as tlora, + a preview (12 Euler steps, CFG 5) every 2nd step, timed apart",
          "tlora_ff": "this trainer, T-LoRA: attention + feed-forward Linears (160)",
          "native": "TrainLoraNode LoRA: every weight of 2+ dims (Linear + conv) + diffs on all 1-D tensors"}


def build_peft(tiny: bool):
    """The diffusers UNet, frozen, on the device (run_peft adds a fresh peft LoRA to it per run, as
    diffusers' train_dreambooth_lora.py sets it up: LoRA parameters in float32)."""
    from diffusers import UNet2DConditionModel
    device = common.device_kind()
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**(TINY_DIFFUSERS if tiny else SD15_DIFFUSERS))
    unet.requires_grad_(False)
    unet.to(device, torch.float32 if device == "cpu" else torch.bfloat16)
    return unet


def run_peft(unet, latent, context, steps: int, checkpointing: bool):
    """`steps` training steps of a fresh peft LoRA: DDPM noise at a uniform t, epsilon-MSE, AdamW.

    Returns (wall gaps, cpu gaps, adapter bytes); the first gap is the warm-up step.
    """
    from diffusers import DDPMScheduler
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    device = latent.device
    if "default" in getattr(unet, "peft_config", {}):
        unet.delete_adapters("default")  # every run starts from a fresh adapter, as ours do
    unet.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, init_lora_weights="gaussian", target_modules=PEFT_TARGETS))
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    if checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    optimizer = torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.999), weight_decay=1e-4, eps=1e-8)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear")
    gen = torch.Generator().manual_seed(0)
    autocast = device.type == "cuda"
    counted = SAVED if SAVED is not None else contextlib.nullcontext()
    stamps = Stamps()
    stamps()
    for _ in range(steps):
        noise = torch.randn(latent.shape, generator=gen).to(device, latent.dtype)
        t = torch.randint(0, 1000, (latent.shape[0],), generator=gen).to(device)
        noisy = scheduler.add_noise(latent, noise, t)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast), counted:
            pred = unet(noisy, t, encoder_hidden_states=context).sample
        loss = torch.nn.functional.mse_loss(pred.float(), noise.float())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        stamps()
    adapter = common.nbytes(get_peft_model_state_dict(unet).values())
    wall, cpu = stamps.gaps()
    return [None] + wall[1:], [None] + cpu[1:], adapter, []


def build(names, resolution: int, tiny: bool = False) -> dict:
    """The models the trainers `names` need: ComfyUI's UNet patcher (`base`), the tiny clip and vae, the
    image, its latent and the prompt's conditioning; the diffusers UNet (`peft`) only for the peft row.
    `tiny`: the test UNet and a diffusers UNet of the same shape (smoke runs)."""
    from support.tiny_model import build_tiny_sd15
    device = common.device_kind()
    tiny_unet, clip, vae = build_tiny_sd15(dtype=torch.float32)
    image = synthetic_image(resolution)
    with torch.no_grad():
        latent = vae.encode(image).float().clone()
        positive = clip.encode_from_tokens_scheduled(clip.tokenize(PROMPT))
    parts = dict(clip=clip, vae=vae, image=image, latent=latent, positive=positive, base=None, peft=None)
    if any(n != "peft" for n in names):
        parts["base"] = tiny_unet if tiny else common.build_sd15_unet(torch.float32 if device == "cpu"
                                                                      else torch.bfloat16)
    if "peft" in names:
        parts["peft"] = build_peft(tiny)
    return parts


def run_variant(name, parts, steps, checkpointing, folder):
    p = parts
    if name == "native":
        return run_native(p["base"], p["latent"], p["positive"], steps, checkpointing)
    if name == "peft":
        dtype = next(p["peft"].parameters()).dtype
        device = next(p["peft"].parameters()).device
        context = p["positive"][0][0].to(device, dtype)
        return run_peft(p["peft"], p["latent"].to(device, dtype), context, steps, checkpointing)
    variant = "tlora" if name in ("tlora_ff", "tlora_preview") else name
    targets = "attention+feedforward" if name == "tlora_ff" else "attention"
    return run_pack(p["base"], p["clip"], p["vae"], p["image"], variant, targets, steps, checkpointing, folder,
                    previews=name == "tlora_preview")


SAVED: SavedTensors | None = None  # set by memory_worker: run_peft counts its forward passes in it


@contextlib.contextmanager
def counting_saved(name: str, saved: SavedTensors):
    """Every training forward pass of trainer `name` inside `saved` (this pack's: in place of the loop's
    saved-tensor context, which is a no-op for SD1.5; TrainLoraNode's: around its fwd_bwd). The pack's
    factors, T-LoRA's frozen copies too, are registered as the adapter's resident tensors."""
    global SAVED
    from comfy_extras import nodes_train
    from tlora_pack.trainer import loop, train
    real_saved, real_fwd_bwd, real_trainable = loop.saved_copies, nodes_train.TrainSampler.fwd_bwd, train.make_trainable

    def counted_fwd_bwd(self, *a, **k):
        with saved:
            return real_fwd_bwd(self, *a, **k)

    def registered(tlora, device):
        params = real_trainable(tlora, device)
        saved.add_adapter(t for f in tlora.layers.values() for t in f.tensors().values())
        return params
    SAVED, loop.saved_copies, train.make_trainable = saved, lambda enabled, model: saved, registered
    nodes_train.TrainSampler.fwd_bwd = counted_fwd_bwd
    try:
        yield
    finally:
        SAVED, loop.saved_copies, nodes_train.TrainSampler.fwd_bwd = None, real_saved, real_fwd_bwd
        train.make_trainable = real_trainable


def memory_worker(name: str, resolution: int, steps: int, checkpointing: bool, tiny: bool) -> dict:
    """Peak memory of `steps` steps of one trainer alone, measured two ways (memory_counts)."""
    parts = build([name], resolution, tiny)
    saved = SavedTensors(parts["peft"] if name == "peft" else parts["base"].model)
    memory = AllocatorPeak(common.device_kind()).start()
    with tempfile.TemporaryDirectory() as folder, counting_saved(name, saved):
        _, _, adapter, _ = run_variant(name, parts, steps, checkpointing, folder)
    peaks = memory.stop()
    return {"variant": name, "peak_bytes": peaks.get("rss", peaks.get("allocator", 0)),
            "allocator_bytes": peaks.get("allocator"), "saved": saved.largest(), "adapter_bytes": adapter}


def timing_worker(names, resolution: int, steps: int, rounds: int, checkpointing: bool, tiny: bool) -> dict:
    parts = build(names, resolution, tiny)
    times = {n: {"steps": [], "cpu": [], "previews": []} for n in names}
    with tempfile.TemporaryDirectory() as folder:
        for r in range(rounds):
            for n in common.round_order(names, r):
                wall, cpu, _, previews = run_variant(n, parts, steps, checkpointing, folder)
                times[n]["steps"] += wall[1:]
                times[n]["cpu"] += cpu[1:]
                times[n]["previews"] += previews
    return {"device": common.device_kind(), "threads": torch.get_num_threads(), "times": times}


# ---------------------------------------------------------------- SD-XL estimate

SDXL_UNET = dict(image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[2, 2, 2],
                 channel_mult=[1, 2, 4], transformer_depth=[0, 0, 2, 2, 10, 10], transformer_depth_middle=10,
                 transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10], use_linear_in_transformer=True,
                 context_dim=2048, num_head_channels=64, adm_in_channels=2816, num_classes="sequential",
                 use_spatial_transformer=True, legacy=False, use_checkpoint=False,
                 use_temporal_attention=False, use_temporal_resblock=False)
ATTN = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
        "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0")


def sdxl_counts(latent: int = 128) -> dict:
    """unet_counts of the SD-XL UNet at 1024 px."""
    return unet_counts(SDXL_UNET, latent, 2048, 2816)


def unet_counts(config: dict, latent: int, context_dim: int, adm: int | None) -> dict:
    """FLOPs of one forward and of forward + backward (input gradients only: the base is frozen),
    bytes kept for backward (bf16, each storage once), and rows / shape of every attention projection,
    for a ComfyUI UNet on the meta device (no memory, no compute)."""
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    from torch.utils.flop_counter import FlopCounterMode
    with torch.device("meta"):
        unet = UNetModel(**config, dtype=torch.bfloat16, operations=comfy.ops.disable_weight_init)
        x = torch.zeros(1, 4, latent, latent, dtype=torch.bfloat16, requires_grad=True)
        t, ctx = torch.zeros(1), torch.zeros(1, 77, context_dim, dtype=torch.bfloat16)
        y = None if adm is None else torch.zeros(1, adm, dtype=torch.bfloat16)
    unet.requires_grad_(False)
    layers, storages = [], {}

    def rows_hook(module, args):
        layers.append((args[0].numel() // args[0].shape[-1], module.weight.shape[1], module.weight.shape[0]))
    handles = [m.register_forward_pre_hook(rows_hook) for n, m in unet.named_modules() if n.endswith(ATTN)]

    def keep(tensor):
        storages[tensor.untyped_storage()._cdata] = tensor.untyped_storage().nbytes()
        return tensor
    with FlopCounterMode(display=False) as counter:
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
            out = unet(x, t, context=ctx, y=y)
        forward = counter.get_total_flops()
        out.float().sum().backward()
    for h in handles:
        h.remove()
    return {"params": sum(p.numel() for p in unet.parameters()), "forward": forward,
            "fwd_bwd": counter.get_total_flops(), "saved_bytes": sum(storages.values()), "layers": layers}


def adapter_flops(layers, k: int, pack: bool) -> float:
    """Extra FLOPs per training step of a T-LoRA (trained and frozen products, k components kept).

    pack: each layer on the cheaper of the weight and activation paths, as the pack's runtime picks
    (tlora_core.adapter.path_costs); otherwise always on activations, as the reference code does.
    """
    from tlora_pack.tlora_core.adapter import path_costs
    costs = [path_costs(rows, i, o, k, True, with_grad=True) for rows, i, o in layers]
    return sum(min(c) if pack else c[1] for c in costs)


def sdxl_estimate(peak_tflops: float = 312.0, utilisation=(0.35, 0.45), steps: int = 800):
    c = sdxl_counts()
    k = (RANK + MIN_RANK) // 2  # t uniform in [0, 1000): r(t) averages (r + r_min) / 2
    adapted = sum(i * o for _, i, o in c["layers"])
    trainable = sum(RANK * (i + o + 1) for _, i, o in c["layers"])
    lines = [f"SD-XL UNet: {c['params'] / 1e9:.3f} B parameters; {len(c['layers'])} attention projections, "
             f"{adapted / 1e6:.0f} M weights adapted; T-LoRA rank {RANK}: {trainable / 1e6:.1f} M trainable "
             f"(+ as many frozen)",
             f"FLOPs per step at 1024 px, batch 1 (meta device, torch.utils.flop_counter): forward "
             f"{c['forward'] / 1e12:.2f} T, forward + input-gradient backward {c['fwd_bwd'] / 1e12:.2f} T"]
    for name, pack in (("this pack (cheaper path per layer)", True), ("reference (on activations)", False)):
        extra = adapter_flops(c["layers"], k, pack)
        total = c["fwd_bwd"] + extra
        times = [total * steps / (peak_tflops * 1e12 * u) / 60 for u in utilisation]
        lines.append(f"  {name:36}: + {extra / 1e12:.2f} T adapter = {total / 1e12:.2f} T/step; "
                     f"{steps} steps at {peak_tflops:.0f} TFLOP/s x {utilisation[0]:.0%}-{utilisation[1]:.0%}: "
                     f"{times[1]:.1f}-{times[0]:.1f} min")
    gib = 2 ** 30
    weights = c["params"] * 2
    text_vae = (123.1e6 + 694.7e6) * 2 + 83.7e6 * 4
    adapters = trainable * 4 * 4 + trainable * 4  # param + grad + 2 AdamW states (fp32), frozen copies
    from tlora_pack.tlora_core.adapter import activations_cheaper
    on_weight = sum(i * o for rows, i, o in c["layers"] if not activations_cheaper(rows, i, o, k, True, True))
    w_eff = on_weight * 2  # a layer on the weight path keeps W + dW (bf16) for backward
    saved = c["saved_bytes"]
    total = weights + text_vae + adapters + saved + w_eff
    lines += ["VRAM estimate (bf16 UNet, fp16 CLIP-L + OpenCLIP-bigG, fp32 VAE kept on the GPU, fp32 T-LoRA + AdamW, "
              "no gradient checkpointing):",
              f"  UNet {weights / gib:.1f} + text encoders and VAE {text_vae / gib:.1f} + T-LoRA with grads and AdamW "
              f"{adapters / gib:.1f} + activations kept for backward {saved / gib:.1f} (counted) + W + dW copies "
              f"{w_eff / gib:.1f} ({on_weight / adapted:.0%} of the adapted weights are on the weight path) = "
              f"{total / gib:.1f} GiB (+ allocator slack, CUDA context ~0.5-1 GiB)"]
    implied = (c["fwd_bwd"] + adapter_flops(c["layers"], k, False)) * steps / (30 * 60) / (peak_tflops * 1e12)
    lines.append(f"The reference code needs about 30 min for these 800 steps: its UNet work alone would then run at "
                 f"{implied:.1%} of peak, so most of its time goes elsewhere (per-step VAE/text encoding, validation "
                 f"sampling, checkpoint writes, batch-1 kernel overheads).")
    return "\n".join(lines)


def adapter_flop_table(resolution: int) -> str:
    """Load-independent figures for the training rows: FLOPs per step of the frozen SD1.5 UNet (forward
    + input-gradient backward, counted on the meta device) and of each trainer's adapters on the 128
    attention projections (tlora_core.adapter's cost model; T-LoRA's averaged over t uniform in 0..999,
    r(t) from the schedule). peft runs B·A·x on activations (forward 2·r·s, backward 4·r·s)."""
    from tlora_pack.tlora_core.adapter import path_costs, split_cost, training_path
    from tlora_pack.tlora_core.schedule import ranks_for_timesteps
    c = unet_counts(common.SD15_UNET, resolution // 8, 768, None)
    ranks = ranks_for_timesteps(torch.arange(1000), RANK, MIN_RANK)

    def per_layer(rows, i, o, k, how):
        weight, activations = path_costs(rows, i, o, k, how != "lora", True)
        if how == "tlora":
            return {"weight": weight, "activations": activations,
                    "split": split_cost(rows, i, o, k)}[training_path(rows, i, o, k, True)]
        return min(weight, activations)

    peft = sum(6 * RANK * rows * (i + o) for rows, i, o in c["layers"])
    rows = {"peft": peft, "lora": sum(per_layer(r, i, o, RANK, "lora") for r, i, o in c["layers"])}
    for name, how in (("tlora before #21", "two_pass"), ("tlora", "tlora")):
        rows[name] = sum(per_layer(r, i, o, k, how) for k in ranks for r, i, o in c["layers"]) / len(ranks)
    base = c["fwd_bwd"]
    lines = [f"FLOPs per training step, SD1.5 UNet at {resolution} px (meta device): frozen base forward + "
             f"input-gradient backward {base / 1e9:.1f} G; adapters on the 128 attention projections:"]
    for name, flops in rows.items():
        lines.append(f"  {name:20} adapters {flops / 1e9:6.2f} G   step {(base + flops) / 1e9:7.1f} G   "
                     f"/ peft {(base + flops) / (base + peft):.3f}x")
    return "\n".join(lines)


# ---------------------------------------------------------------- driver

TIME_PAIRS = [("tlora", "peft", "T-LoRA / peft LoRA", "  (goal <= 1.0x)"),
              ("lora", "peft", "plain LoRA / peft LoRA", "  (goal <= 1.0x)"),
              ("tlora", "lora", "T-LoRA / plain LoRA", "  (goal <= 1.1x)"),
              ("tlora_preview", "tlora", "steps beside previews / T-LoRA", "  (previews leave steps alone: ~1.0x)"),
              ("tlora_ff", "native", "T-LoRA attn+ff / native", "  (goal <= 0.8x)"),
              ("tlora", "native", "T-LoRA / native", "")]


def report(timing: dict, memory: dict, resolution: int, steps: int, rounds: int, checkpointing: bool, model: str):
    t = timing["times"]
    wall, cpu = common.step_medians(t)
    print(f"\ndevice {timing['device']} ({timing['threads']} threads); {model}, {resolution} px, batch 1, "
          f"rank {RANK}, gradient checkpointing {'on' if checkpointing else 'off'}; {rounds} rounds x {steps} "
          f"steps per trainer, interleaved, first step of each run not timed")
    print(f"{'trainer':13} {'wall s/step':>11} {'(min':>6} {'max)':>6} {'CPU s/step':>10} {'n':>3} {'peak MiB':>9} "
          f"{'adapter MiB':>11}  adapts")
    for v, x in t.items():
        m = memory.get(v, {})
        print(f"{v:13} {wall[v]:11.2f} {min(x['steps']):6.2f} {max(x['steps']):6.2f} {cpu[v]:10.2f} {len(x['steps']):3d} "
              f"{common.mib(m.get('peak_bytes', 0)):9.1f} {common.mib(m.get('adapter_bytes', 0)):11.1f}  {ADAPTS[v]}")
    for line in (common.ratio_lines(wall, "wall, median", TIME_PAIRS)
                 + common.ratio_lines(cpu, "CPU,  median", TIME_PAIRS)):
        print(line)
    preview_cost(t, wall)
    memory_report(memory, timing["device"])


def memory_report(memory: dict, device: str):
    """Per trainer: the bytes autograd saved for backward (largest step, by kind) beside the allocator's
    and the RSS peak above the built model; then the ratios of each measure."""
    mib = common.mib
    print("\nmemory of one step, two ways (memory_counts.py); 'saved' = what autograd keeps for backward, each "
          "storage once (model weights and the adapter's tensors, resident anyway, apart)")
    print(f"{'trainer':13} {'saved MiB':>9} {'allocator peak':>14} {'peak RSS':>9}  saved by kind (MiB)")
    for v, m in memory.items():
        saved = m.get("saved") or {}
        kinds = ", ".join(f"{k} {mib(b):.1f}" for k, b in sorted(saved.items(), key=lambda kv: -kv[1]) if b >= 2 ** 19)
        rss = mib(m["peak_bytes"]) if device != "cuda" else float("nan")
        print(f"{v:13} {mib(extra_bytes(saved)):9.1f} {mib(m.get('allocator_bytes') or 0):14.1f} {rss:9.1f}  {kinds}")
    measures = {"saved for backward": lambda m: extra_bytes(m.get("saved") or {}),
                "allocator peak": lambda m: m.get("allocator_bytes") or 0}
    if device != "cuda":
        measures["peak RSS"] = lambda m: m["peak_bytes"]
    for x, y, name, goal in TIME_PAIRS:
        if x in memory and y in memory:
            ratios = [f"{label} {f(memory[x]) / max(f(memory[y]), 1):.3f}x" for label, f in measures.items()]
            print(f"memory {name + ':':32} " + ", ".join(ratios))


def preview_cost(times: dict, wall: dict):
    """The previews' time: per preview, in training steps, and as preview time / training time at the
    benchmark's every-2-steps and at the train_and_sample workflow's every 100 steps."""
    import statistics
    shots = times.get("tlora_preview", {}).get("previews") or []
    if not shots or "tlora_preview" not in wall:
        return
    one, step = statistics.median(shots), wall["tlora_preview"]
    recipe = sd_preview()
    print(f"previews ({len(shots)}, {recipe.steps} Euler steps at CFG {recipe.cfg:g}): "
          f"median {one:.2f} s each = {one / step:.2f} training steps; preview time / training time: "
          f"{one / (PREVIEW_EVERY * step):.3f} every {PREVIEW_EVERY} steps, {one / (100 * step):.3f} every 100 steps "
          f"(the workflow's); the VAE decodes them once after training (not timed)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trainers", default="peft,lora,tlora,tlora_ff,native", help=", ".join(ADAPTS))
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4, help="steps per run (the first is a warm-up, not timed)")
    parser.add_argument("--rounds", type=int, default=2,
                        help="interleaved rounds over the trainers (every other one in reverse order)")
    parser.add_argument("--memory-steps", type=int, default=2)
    parser.add_argument("--gradient-checkpointing", choices=("off", "on"), default="off")
    parser.add_argument("--estimate-only", action="store_true", help="only the SD-XL estimate (meta device, ~1 min)")
    parser.add_argument("--no-estimate", action="store_true", help="leave the SD-XL estimate out")
    parser.add_argument("--memory-only", action="store_true", help="the memory runs only (no timing run)")
    parser.add_argument("--flops-only", action="store_true", help="only the FLOP table (meta device, ~1 min)")
    parser.add_argument("--tiny-unet", action="store_true", help="the 25.8 M test UNet instead (a smoke run)")
    parser.add_argument("--real-init", action="store_true", help="run the Ortho-LoRA SVD init (slow; not timed)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    names, ckpt = args.trainers.split(","), args.gradient_checkpointing == "on"
    common.setup_pack()
    if args.worker:
        if args.threads:
            torch.set_num_threads(args.threads)
        if not args.real_init:
            fast_ortho_init()
        out = (timing_worker(names, args.resolution, args.steps, args.rounds, ckpt, args.tiny_unet)
               if args.worker == "timing" else memory_worker(args.worker, args.resolution, args.memory_steps, ckpt,
                                                             args.tiny_unet))
        print(common.RESULT_TAG + json.dumps(out), flush=True)
        return
    start = time.perf_counter()
    if args.flops_only:
        print(adapter_flop_table(args.resolution))
        return
    unknown = sorted(set(names) - set(ADAPTS))
    if unknown:
        raise SystemExit(f"unknown trainers {unknown}: choose from {', '.join(ADAPTS)}")
    print(common.environment(), flush=True)
    if not args.estimate_only:
        flags = ["--trainers", args.trainers, "--resolution", str(args.resolution), "--steps", str(args.steps),
                 "--rounds", str(args.rounds), "--memory-steps", str(args.memory_steps),
                 "--gradient-checkpointing", args.gradient_checkpointing, "--threads", str(args.threads),
                 *(["--tiny-unet"] if args.tiny_unet else []), *(["--real-init"] if args.real_init else [])]
        memory = {}
        for n in names:
            print(f"-- memory run: {n}", flush=True)
            memory[n] = common.run_child(["--worker", n, *flags], script=__file__)
        model = "tiny test UNet (25.8 M)" if args.tiny_unet else "full SD1.5 UNet (859.5 M)"
        if args.memory_only:
            print(f"\n{model}, {args.resolution} px, batch 1, rank {RANK}; {args.memory_steps} steps per trainer")
            memory_report(memory, common.device_kind())
        else:
            print("-- timing run: " + ", ".join(names), flush=True)
            timing = common.run_child(["--worker", "timing", *flags], script=__file__)
            report(timing, memory, args.resolution, args.steps, args.rounds, ckpt,
                   model + (" fp32" if timing["device"] == "cpu" else " bf16"))
        print(f"load average at end: {common.load_average()}")
    if not args.no_estimate:
        print("\n" + adapter_flop_table(args.resolution))
        print("\n" + sdxl_estimate())
    print(f"\ntotal wall time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()

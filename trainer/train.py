"""One training run of "Train T-LoRA from image": data, factors, optimiser, saving, progress, cancel."""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

import comfy.model_management as mm
import comfy.patcher_extension as pe

from ..tlora_core.adapter import TRAINABLE_FIELDS, LayerFactors
from ..tlora_core.config import TLoraConfig
from ..tlora_core.errors import TLoraError
from ..tlora_core.format import TLora, load_tlora, save_tlora
from ..tlora_core.init import init_factors
from .data import prepare_images
from .files import next_free_path
from .loop import LoopHooks, PositiveOnlyGuider, TrainSampler
from .runtime import apply_tlora
from .settings import TARGETS, TrainSettings

NATIVE_RESOLUTION = {"SD15": 512, "SD20": 768, "SD21UnclipL": 768, "SD21UnclipH": 768}
AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class TrainResult:
    tlora: TLora            # the trained T-LoRA as read back from its final file
    saved: list[Path]       # every file written, oldest first
    losses: list[float]


def find_target_layers(diffusion_model: torch.nn.Module, targets: str) -> dict[str, torch.nn.Module]:
    """Linear layers whose path ends with one of the target suffixes, keyed `diffusion_model.<path>`."""
    suffixes = tuple("." + s for s in TARGETS[targets])
    found = {f"diffusion_model.{name}": m for name, m in diffusion_model.named_modules()
             if name.endswith(suffixes) and getattr(m, "weight", None) is not None and m.weight.dim() == 2}
    if not found:
        raise TLoraError(f"this model has no layers named like {', '.join(TARGETS[targets])}; "
                         f"T-LoRA training supports UNet models with attention blocks (SD1.5, SD-XL).")
    return found


def new_factors(layers: dict[str, torch.nn.Module], s: TrainSettings, ortho: bool, device) -> dict[str, LayerFactors]:
    """Seeded initial factors per layer, on the training device, float32."""
    return {key: init_factors(ortho, m.weight.shape[1], m.weight.shape[0], s.rank, s.init, s.seed, key,
                              device=device) for key, m in layers.items()}


def make_trainable(tlora: TLora, device) -> list[torch.Tensor]:
    """Move factors to the device; trainable ones become leaf tensors with grad, frozen ones stay without."""
    params = []
    for key, f in tlora.layers.items():
        f = f.to(device=device, dtype=torch.float32)
        for name in TRAINABLE_FIELDS:
            t = getattr(f, name)
            if t is not None:
                t = t.detach().clone().requires_grad_(True)
                setattr(f, name, t)
                params.append(t)
        tlora.layers[key] = f
    return params


def detached_copy(tlora: TLora, steps_done: int, settings: TrainSettings) -> TLora:
    """A CPU snapshot of the factors with the training record updated."""
    layers = {k: LayerFactors(**{n: t.detach().to("cpu", copy=True) for n, t in f.tensors().items()})
              for k, f in tlora.layers.items()}
    config = tlora.config.replace(training={**settings.record(), "steps_done": steps_done})
    return TLora(config=config, layers=layers)


def checkpoint_units(diffusion_model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules whose forward gets checkpointed: each block of the model's ModuleLists (and its
    middle block); for Sequential blocks their layers, because ComfyUI's UNet calls those one by one."""
    blocks = [b for child in diffusion_model.children() if isinstance(child, torch.nn.ModuleList) for b in child]
    middle = getattr(diffusion_model, "middle_block", None)
    blocks += [middle] if isinstance(middle, torch.nn.Module) else []
    return [unit for b in blocks for unit in (list(b.children()) if isinstance(b, torch.nn.Sequential) else [b])]


@contextlib.contextmanager
def checkpointed_blocks(diffusion_model: torch.nn.Module, enabled: bool):
    """Gradient checkpointing: activations inside each unit are recomputed in backward, not kept.

    Sets an instance `forward` on each unit and removes it on exit.
    """
    units = checkpoint_units(diffusion_model) if enabled else []
    for unit in units:
        unit.forward = (lambda inner: lambda *a, **k: torch.utils.checkpoint.checkpoint(
            inner, *a, use_reentrant=False, **k))(unit.forward)
    try:
        yield
    finally:
        for unit in units:
            del unit.forward


def encode(vae, clip, pixels: torch.Tensor, weights: Optional[torch.Tensor], prompt: str):
    """Latents, latent-size loss weights and the prompt's conditioning, computed once, without gradients.

    Cloned so that they are ordinary tensors even when ComfyUI runs the node in inference mode.
    """
    with torch.no_grad():
        latents = vae.encode(pixels).float().clone()
        lw = None
        if weights is not None:
            lw = F.interpolate(weights.unsqueeze(1).float(), size=latents.shape[-2:], mode="area").clone()
        positive = clip.encode_from_tokens_scheduled(clip.tokenize(prompt))
        positive = [[c[0].clone(), {k: (v.clone() if torch.is_tensor(v) else v) for k, v in c[1].items()}]
                    for c in positive]
    return latents, lw, positive


@contextlib.contextmanager
def frozen_base(model: torch.nn.Module):
    """No gradients for the base model's own weights during training; flags put back afterwards.

    Also raises ComfyUI's `in_training` flag (newer ComfyUI turns off kernels without autograd support
    when it is set; older versions ignore it).
    """
    flags = [p for p in model.parameters() if not p.is_inference() and p.requires_grad]
    for p in flags:
        p.requires_grad_(False)
    was_training = getattr(mm, "in_training", False)
    mm.in_training = True
    try:
        yield
    finally:
        mm.in_training = was_training
        for p in flags:
            p.requires_grad_(True)


def _fresh_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A weight function that changes nothing: its presence makes ComfyUI's ops copy the weight."""
    return tensor


def inference_weight_copies() -> pe.PatcherInjection:
    """An injection that lets autograd run through a model loaded in inference mode.

    ComfyUI runs nodes in inference mode, so a model loaded there holds inference tensors, which
    autograd may not save for backward. For every ComfyUI op whose weight or bias is one, a no-op
    weight/bias function is added: the op then hands forward a fresh (ordinary) copy. An injection,
    because ModelPatcher.load resets these lists and re-applies injections afterwards.
    """
    added = []

    def inject(patcher):
        for m in patcher.model.modules():
            if not hasattr(m, "comfy_cast_weights"):
                continue
            for attr, fn_list in (("weight", "weight_function"), ("bias", "bias_function")):
                t = getattr(m, attr, None)
                if t is not None and t.is_inference():
                    setattr(m, fn_list, list(getattr(m, fn_list)) + [_fresh_copy])
                    added.append((m, fn_list))

    def eject(patcher):
        for m, fn_list in added:
            setattr(m, fn_list, [f for f in getattr(m, fn_list) if f is not _fresh_copy])
        added.clear()

    return pe.PatcherInjection(inject=inject, eject=eject)


def resolve_dtype(name: str, device) -> Optional[torch.dtype]:
    """Autocast dtype: None means plain fp32. 'auto' is bf16 on GPUs that have it, else fp32."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" and mm.should_use_bf16(device) else None
    return AUTOCAST[name]


def train_tlora(model, clip, vae, image: torch.Tensor, mask: Optional[torch.Tensor], settings: TrainSettings,
                output_folder: str, prefix: str, resume: Optional[TLora] = None,
                progress: Optional[Callable[[int, int, float], None]] = None) -> TrainResult:
    """Train a T-LoRA on `model` (never modified) and save it under output_folder/prefix_NNNNN.safetensors."""
    base_model = type(model.model.model_config).__name__
    pixels, weights = prepare_images(image, mask, settings.resolution, NATIVE_RESOLUTION.get(base_model, 1024))
    config = settings.tlora_config(base_model, source="comfyui-tlora trainer")
    start = check_resume(resume, config, settings) if resume is not None else 0
    next_free_path(output_folder, prefix)  # refuse a bad file name before training, not after
    saved: list[Path] = []
    losses: list[float] = []
    device = mm.get_torch_device()
    with torch.inference_mode(False), torch.enable_grad():
        latents, pixel_weights, positive = encode(vae, clip, pixels, weights, settings.prompt)
        if resume is None:
            layers = find_target_layers(model.model.diffusion_model, settings.targets)
            tlora = TLora(config, new_factors(layers, settings, config.ortho, device))
        else:
            tlora = TLora(config, dict(resume.layers))
        params = make_trainable(tlora, device)
        patched, runtime = apply_tlora(model, tlora, 1.0)
        patched.set_injections(f"{runtime.key}-training", [inference_weight_copies()])
        optimizer = torch.optim.AdamW(params, lr=settings.learning_rate, betas=(0.9, 0.999),
                                      weight_decay=settings.weight_decay, eps=1e-8)

        def save(step: int):
            path = next_free_path(output_folder, prefix, f"{step}steps" if step < settings.steps else "")
            saved.append(save_tlora(detached_copy(tlora, step, settings), path, storage=settings.storage))
            logging.info("T-LoRA: saved %s", saved[-1])

        def on_step(step: int, loss: float):
            losses.append(loss)
            if progress is not None:
                progress(step, settings.steps, loss)

        hooks = LoopHooks(on_step=on_step, save=save, start_step=start,
                          should_save=lambda step: step < settings.steps and settings.save_every > 0
                          and step % settings.save_every == 0)
        sampler = TrainSampler(pixel_weights, settings.batch_size, optimizer, settings.steps, settings.seed,
                               resolve_dtype(settings.training_dtype, device), hooks, runtime)
        guider = PositiveOnlyGuider(patched)
        guider.set_conds(positive)
        try:
            with frozen_base(model.model), checkpointed_blocks(model.model.diffusion_model,
                                                                settings.gradient_checkpointing):
                guider.sample(torch.zeros_like(latents), latents, sampler, torch.tensor([1.0, 0.0]),
                              seed=settings.seed, disable_pbar=True)
            save(settings.steps)
        except mm.InterruptProcessingException:
            if losses:  # keep what was learned: a cancelled run still leaves a file
                save(start + len(losses))
            raise
        except (TLoraError, OSError) as exc:
            where = f" Last good file: {saved[-1]}." if saved else " No file was saved."
            raise TLoraError(f"{exc}{where}") from exc
        except Exception:
            # Anything else (out of memory, say) keeps its type, so ComfyUI's own handling still
            # applies; the log says what survived.
            logging.error("T-LoRA: training stopped at step %d of %d. %s", start + len(losses), settings.steps,
                          f"Last good file: {saved[-1]}." if saved else "No file was saved.")
            raise
    # Hand on exactly what the file holds, so sampling now and loading the file later agree bit for bit.
    return TrainResult(load_tlora(saved[-1]), saved, losses)


def check_resume(resume: TLora, config: TLoraConfig, settings: TrainSettings) -> int:
    """Steps already done by a T-LoRA given back to continue training; refuses a mismatched one."""
    if (resume.config.rank, resume.config.variant) != (config.rank, config.variant):
        raise TLoraError(f"cannot resume a {resume.config.variant} rank {resume.config.rank} T-LoRA as a "
                         f"{config.variant} rank {config.rank} one; set the same variant and rank.")
    done = int(resume.config.training.get("steps_done", 0))
    if done >= settings.steps:
        raise TLoraError(f"the T-LoRA to resume has already done {done} steps; set steps above {done}.")
    return done

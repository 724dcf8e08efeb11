"""The training loop, run inside ComfyUI's sampling machinery (a CFGGuider with a custom Sampler).

Going through the guider lets ComfyUI load the model, turn the conditioning into the model's inputs
for any model family (SD1.5 cross-attention, SD-XL pooled and size embeddings, Flux guidance) and
run the model's wrappers, so the T-LoRA runtime sets each step's rank mask from the sigma it sees.
"""
from __future__ import annotations

import contextlib
import math
import weakref
from dataclasses import dataclass
from typing import Callable, Optional

import torch

import comfy.model_management as mm
import comfy.model_sampling as ms_lib
import comfy.samplers

from ..tlora_core.errors import TLoraError
from .optim import optimizer_step
from .preview import PreviewSettings, sample_preview
from .timesteps import timesteps_from_sigmas

FLOW_STEPS = 1000  # the reference FLUX code's flow times k / 1000, k = 1..1000


def draw_sigmas(kind: str, model_sampling, batch: int, generator: torch.Generator) -> torch.Tensor:
    """Noise levels for a training batch, as the family's reference recipe draws them (Recipe.sigma_draw).

    "timestep": uniform over the model's own sigma table, as the paper draws t uniformly in 0..999 for
    SD-XL (LCM: its 50 original timesteps). "flow": sigma = k / 1000 with k uniform in 1..1000, not
    shifted, as the reference FLUX code draws it, whatever shift the model samples with (a shifted table
    would put 44 % of Flux-dev's steps above sigma 0.8 instead of 20 %, and starve the components the mask
    keeps for low noise). The rank mask then follows the sigma actually used (trainer.timesteps), exactly as
    at inference.
    """
    if kind == "flow":
        if not isinstance(model_sampling, ms_lib.CONST):
            raise TLoraError(f"sigma_draw 'flow' needs a flow model, but this model samples with "
                             f"{type(model_sampling).__name__}; use sigma_draw 'timestep' (or auto).")
        return torch.randint(1, FLOW_STEPS + 1, (batch,), generator=generator).double().div(FLOW_STEPS).float()
    table = model_sampling.sigmas.float()
    return table.cpu()[torch.randint(0, table.shape[0], (batch,), generator=generator)]


def random_squares(latents: torch.Tensor, weights: Optional[torch.Tensor], pick: torch.Tensor,
                   generator: torch.Generator) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """For each picked image, a square of the latents' short side at a random place (the reference FLUX
    transform's random crop, in latent cells), and the same square of its loss weights."""
    h, w = latents.shape[-2:]
    side = min(h, w)
    tops = torch.randint(0, h - side + 1, (len(pick),), generator=generator).tolist()
    lefts = torch.randint(0, w - side + 1, (len(pick),), generator=generator).tolist()
    x0 = torch.stack([latents[i, ..., t:t + side, l:l + side] for i, t, l in zip(pick.tolist(), tops, lefts)])
    if weights is None:
        return x0, None
    return x0, torch.stack([weights[i, ..., t:t + side, l:l + side] for i, t, l in zip(pick.tolist(), tops, lefts)])


def centre_square(latents: torch.Tensor) -> torch.Tensor:
    """The centred square of the latents' short side (what a preview is shaped like)."""
    h, w = latents.shape[-2:]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    return latents[..., top:top + side, left:left + side]


def loss_weights(model_sampling, sigma: torch.Tensor) -> torch.Tensor:
    """Per-sample weight that turns an x0-space squared error into the model's own objective.

    ComfyUI's model returns x0. For epsilon and flow (velocity) models the native error equals the
    x0 error divided by sigma; for v-prediction it is scaled by sqrt(sigma^2 + sd^2) / (sigma * sd).
    """
    if isinstance(model_sampling, ms_lib.X0):
        return torch.ones_like(sigma)
    if isinstance(model_sampling, ms_lib.V_PREDICTION):
        sd = float(model_sampling.sigma_data)
        return (sigma ** 2 + sd ** 2) / (sigma ** 2 * sd ** 2)
    return 1.0 / sigma ** 2


def frozen_storages(module: torch.nn.Module) -> frozenset:
    """Identities of the storages of a module's parameters (the frozen weights), for SavedCopies. Taken while
    the parameters are alive and used only then: a freed storage's identity can come back for a new tensor."""
    return frozenset(p.untyped_storage()._cdata for p in module.parameters())


class SavedCopies:
    """What autograd keeps of the tensors it saves when the model changes saved tensors in place: a copy,
    except of a frozen weight's storage, which nothing writes into during a step (copying those would hold a
    second copy of every weight the forward goes through). A region saved again unchanged (the q, k and v
    slices of one fused weight each save their layer's input) shares its first copy, while the storage it
    was copied from is alive (a freed storage's identity can pass to another)."""

    def __init__(self, frozen: frozenset):
        self.frozen, self.copies = frozen, {}

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage._cdata in self.frozen:
            return tensor
        key = (storage._cdata, tensor.storage_offset(), tuple(tensor.shape), tensor.stride(), tensor.dtype,
               tensor._version)
        alive, copy = self.copies.get(key, (None, None))
        if alive is not None and alive() is storage:
            return copy
        copy = tensor.clone()
        self.copies[key] = (weakref.ref(storage), copy)
        return copy


def saved_copies(enabled: bool, model: torch.nn.Module):
    """Autograd keeps copies of the tensors it saves for backward (SavedCopies: not of `model`'s weights), so a
    model that then changes them in place (Flux's `x += ...` residual adds) still back-propagates correctly;
    costs their memory once more."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autograd.graph.saved_tensors_hooks(SavedCopies(frozen_storages(model)).pack, lambda t: t)


class PositiveOnlyGuider(comfy.samplers.CFGGuider):
    """Guidance scale 1 with the training prompt only: one model evaluation per step, no CFG batch.
    `extra` conditions (the previews') are processed with it and read by their own code."""

    def set_conds(self, positive, **extra):
        self.inner_set_conds({"positive": positive, **extra})

    def predict_noise(self, x, timestep, model_options={}, seed=None):
        return comfy.samplers.sampling_function(self.inner_model, x, timestep, None, self.conds.get("positive"),
                                                1.0, model_options=model_options, seed=seed)


@dataclass
class LoopHooks:
    """Callbacks of the surrounding run: one step finished, time to save, a preview latent made."""

    on_step: Callable[[int, float], None]
    should_save: Callable[[int], bool]
    save: Callable[[int], None]
    start_step: int = 0
    on_preview: Optional[Callable[[int, torch.Tensor], None]] = None


@dataclass
class StepRecipe:
    """How each step draws its data and updates the factors (from TrainSettings, resolved per family)."""

    batch_size: int = 1
    sigma_draw: str = "timestep"    # see draw_sigmas
    random_crop: bool = False       # a random square per step from wider latents (else they are square)
    max_grad_norm: float = 0.0      # 0: no clipping
    scaler: Optional[torch.amp.GradScaler] = None  # fp16 compute


class TrainSampler(comfy.samplers.Sampler):
    """A 'sampler' whose sample() runs the optimisation loop and returns the latent unchanged."""

    def __init__(self, pixel_weights: Optional[torch.Tensor], recipe: StepRecipe, optimizer: torch.optim.Optimizer,
                 steps: int, seed: int, autocast_dtype: Optional[torch.dtype], hooks: LoopHooks, runtime,
                 copy_saved: bool = False, previews: Optional[PreviewSettings] = None):
        self.pixel_weights, self.recipe, self.optimizer = pixel_weights, recipe, optimizer
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        self.runtime, self.copy_saved, self.previews = runtime, copy_saved, previews
        self.steps, self.autocast_dtype, self.hooks = steps, autocast_dtype, hooks
        self.generator = torch.Generator(device="cpu").manual_seed(seed + hooks.start_step)
        self.last_t: Optional[float] = None  # the latest step's mean t, for the loss chart

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        model_sampling = model_wrap.inner_model.model_sampling
        latents = latent_image  # the encoded images, already through the model's process_latent_in
        weights = None if self.pixel_weights is None else self.pixel_weights.to(latents.device)
        for step in range(self.hooks.start_step, self.steps):
            mm.throw_exception_if_processing_interrupted()
            loss = self.one_step(model_wrap, model_sampling, latents, weights, extra_args)
            self.hooks.on_step(step + 1, loss)
            if self.hooks.should_save(step + 1):
                self.hooks.save(step + 1)
            if self.previews is not None and self.previews.due(step + 1):
                with torch.no_grad(), self.autocast(latents.device):
                    preview = sample_preview(model_wrap, extra_args, centre_square(latents[:1]), self.previews,
                                             self.max_denoise)
                self.hooks.on_preview(step + 1, preview)
        return latent_image

    def autocast(self, device: torch.device):
        return torch.autocast(device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None)

    def one_step(self, model_wrap, model_sampling, latents, weights, extra_args) -> float:
        n, recipe = self.recipe.batch_size, self.recipe
        pick = torch.randint(0, latents.shape[0], (n,), generator=self.generator)
        sigma = draw_sigmas(recipe.sigma_draw, model_sampling, n, self.generator).to(latents.device, torch.float32)
        if recipe.random_crop:
            x0, w = random_squares(latents, weights, pick, self.generator)
        else:
            x0, w = latents[pick.to(latents.device)], None if weights is None else weights[pick.to(weights.device)]
        noise = torch.randn(x0.shape, generator=self.generator).to(x0.device, x0.dtype)
        xt = model_sampling.noise_scaling(sigma, noise, x0, False)
        self.last_t = float(timesteps_from_sigmas(model_sampling, sigma, self.runtime.schedule.max_timestep).mean())
        with self.autocast(x0.device), saved_copies(self.copy_saved, model_wrap.inner_model):
            denoised = model_wrap(xt, sigma, **extra_args)
        err = (denoised.float() - x0.float()) ** 2
        dims = tuple(range(1, err.dim()))  # [batch, channels, (frames,) height, width]
        if w is not None:  # [batch, 1, height, width]
            w = w.reshape(w.shape[0], 1, *([1] * (err.dim() - 4)), *w.shape[-2:]).expand_as(err)
            per_sample = (err * w).sum(dim=dims) / w.sum(dim=dims).clamp_min(1e-8)
        else:
            per_sample = err.mean(dim=dims)
        loss = (per_sample * loss_weights(model_sampling, sigma)).mean()
        value = float(loss.detach())
        if not math.isfinite(value):
            raise TLoraError(f"the training loss became {value} (not finite). Lower the learning rate or use "
                             f"training_dtype fp32.")
        with self.runtime.replaying_last_call():
            optimizer_step(self.optimizer, loss, self.params, recipe.max_grad_norm, recipe.scaler,
                           lambda scaled: scaled.backward())
        return value

"""Preview images while training: every N steps, one image sampled with the adapter as it is then.

A preview is what the user would get from KSampler (euler, simple scheduler, the preview's steps, CFG
and seed) with the T-LoRA of that step applied: the same noise (ComfyUI's prepare_noise), the same
sigmas, the same CFG function, on the model being trained, so the rank mask follows each preview
step's sigma as it does at inference. The prompt is the training subject in a new context (the
reference code validates the same way), so a preview shows both whether the subject is learned and
whether the prompt still steers the image.

Previews run between two training steps, without gradients, on their own noise: the training run
(its random draws, its factors, its files) is the same with or without them.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import torch

import comfy.k_diffusion.sampling as k_sampling
import comfy.model_management as mm
import comfy.sample
import comfy.samplers

from ..tlora_core.config import finite_number, whole_number
from ..tlora_core.errors import TLoraConfigError
from ..tlora_core.families import Preview

# The guider's condition keys for previews (processed by ComfyUI with the training condition)
POSITIVE, NEGATIVE = "tlora_preview_positive", "tlora_preview_negative"
SCHEDULER = "simple"


@dataclass(frozen=True)
class PreviewSettings:
    """One run's previews: how often, and a family's `Preview` (its defaults here) with the node's overrides."""

    every: int = 0                             # a preview after every `every` steps; 0: no previews
    steps: int = Preview.steps                 # Euler steps of one preview
    cfg: float = Preview.cfg
    seed: int = 0
    prompt: str = "a photo of sks dog on the beach"
    guidance: Optional[float] = Preview.guidance  # for guidance-distilled models (Flux: 3.5)

    def __post_init__(self):
        def bad(name, fix):
            raise TLoraConfigError(f"preview {name} = {getattr(self, name)!r}: {fix}")
        if not whole_number(self.every) or self.every < 0:
            bad("every", "must be a whole number >= 0 (0 turns previews off).")
        if not whole_number(self.steps) or self.steps < 1:
            bad("steps", "must be a whole number >= 1.")
        if not (finite_number(self.cfg) and self.cfg > 0):
            bad("cfg", "must be a finite number > 0.")
        if self.guidance is not None and not finite_number(self.guidance):
            bad("guidance", "must be a finite number.")

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0


def zeroed(conditioning):
    """A CONDITIONING of zeros shaped like `conditioning` (as ComfyUI's ConditioningZeroOut): the
    negative of a preview when no text encoder is connected."""
    return [[torch.zeros_like(c), {k: (torch.zeros_like(v) if k == "pooled_output" and torch.is_tensor(v) else v)
                                   for k, v in extra.items()}] for c, extra in conditioning]


def preview_conditions(clip, training_positive, settings: PreviewSettings) -> dict:
    """The guider's extra conditions for previews: the preview prompt encoded with `clip` (at the
    family's preview guidance), and for CFG above 1 the empty prompt as negative. Without a clip the
    prompt cannot be encoded: previews then show the training conditioning, and the log says so."""
    if clip is None:
        logging.warning("T-LoRA: no CLIP connected, so previews use the training conditioning instead of the "
                        "preview prompt %r.", settings.prompt)
        positive = training_positive
        negative = zeroed(training_positive)
    else:
        positive = clip.encode_from_tokens_scheduled(clip.tokenize(settings.prompt))
        if settings.guidance is not None:
            positive = [[c, {**extra, "guidance": settings.guidance}] for c, extra in positive]
        negative = clip.encode_from_tokens_scheduled(clip.tokenize("")) if settings.cfg != 1 else None
    return {POSITIVE: positive} if negative is None else {POSITIVE: positive, NEGATIVE: negative}


def sample_preview(guider, extra_args: dict, like: torch.Tensor, settings: PreviewSettings,
                   max_denoise) -> torch.Tensor:
    """One preview latent shaped like `like` (one training latent, on the training device), in the
    sampler's latent space (before process_latent_out).

    guider: the training run's CFGGuider while it samples (its model, processed conditions and model
    options); max_denoise: ComfyUI's Sampler.max_denoise, to scale the first noise as KSampler does.
    """
    model = guider.inner_model
    model_sampling = model.model_sampling
    sigmas = comfy.samplers.calculate_sigmas(model_sampling, SCHEDULER, settings.steps).to(like.device)
    empty = torch.zeros(like.shape, dtype=torch.float32)  # an empty latent, as EmptyLatentImage makes
    noise = comfy.sample.prepare_noise(empty, settings.seed).to(like.device)
    x = model_sampling.noise_scaling(sigmas[0], noise, empty.to(like.device), max_denoise(guider, sigmas))
    options = dict(extra_args["model_options"])
    options["transformer_options"] = {**options.get("transformer_options", {}), "sample_sigmas": sigmas}
    positive, negative = guider.conds[POSITIVE], guider.conds.get(NEGATIVE)

    def denoised(x, sigma, **_):
        return comfy.samplers.sampling_function(model, x, sigma, negative, positive, settings.cfg,
                                                model_options=options, seed=settings.seed)

    def interruptible(_):
        mm.throw_exception_if_processing_interrupted()

    x = k_sampling.sample_euler(denoised, x, sigmas, callback=interruptible, disable=True)
    return model_sampling.inverse_noise_scaling(sigmas[-1], x)

"""The paper's t (0..T) for the sigmas of a ComfyUI model call, whatever the model's sampling.

ComfyUI passes sigmas to the model. SD1.5 / SD-XL (ModelSamplingDiscrete) map a sigma to the index
of the nearest training sigma, which is t itself. SD3 (ModelSamplingDiscreteFlow) gives
t = multiplier * sigma, and Flux-like models (ModelSamplingFlux) use sigma in [0, 1], so t = 1000 * sigma.
The model_sampling object is read at call time, because ModelSampling* nodes replace it.
"""
from __future__ import annotations

import logging

import torch

import comfy.model_sampling as ms_lib

from ..tlora_core.schedule import DEFAULT_T, t_from_sigma_discrete, t_from_sigma_flow

_warned: set[str] = set()


def timesteps_from_sigmas(model_sampling, sigma: torch.Tensor, T: int = DEFAULT_T) -> torch.Tensor:
    """t in [0, T] (float32, one per batch row) for the sigmas of one model call."""
    sigma = sigma.detach().reshape(-1)
    if isinstance(model_sampling, ms_lib.ModelSamplingDiscreteFlow):
        t = t_from_sigma_flow(sigma, float(model_sampling.multiplier))
    elif isinstance(model_sampling, ms_lib.ModelSamplingFlux):
        t = t_from_sigma_flow(sigma, float(T))
    elif isinstance(model_sampling, ms_lib.ModelSamplingDiscrete) and not isinstance(
            model_sampling, ms_lib.ModelSamplingDiscreteEDM):
        t = t_from_sigma_discrete(sigma, model_sampling.sigmas)
    else:
        name = type(model_sampling).__name__
        if name not in _warned:
            _warned.add(name)
            logging.warning("T-LoRA: model sampling %s has no known sigma -> t rule; using its own "
                            "timestep(sigma) clamped to [0, %d].", name, T)
        t = model_sampling.timestep(sigma).float()
    return t.clamp(0, T)

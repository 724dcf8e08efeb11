"""The paper's t (0..T) for the sigmas of a ComfyUI model call: one rule per model-sampling class.

ComfyUI hands the model sigmas; the rank schedule needs the paper's t. `SIGMA_TO_T` holds the rule of
every model-sampling class of ComfyUI 0.3.75 and 0.33 (comfy/model_sampling.py and the distilled LCM
class of comfy_extras/nodes_model_advanced.py). A model's sampling object is a class made on the fly
from one of these and a prediction type, so the rule is found by walking its bases, most specific
first. Classes are named, not imported: the same table serves hosts that lack some of them. The
object is read at every call, because ModelSampling* nodes replace it.
"""
from __future__ import annotations

import logging
from typing import Callable, NamedTuple

import torch

from ..tlora_core.schedule import DEFAULT_T, t_from_sigma_flow, t_from_sigma_sd_schedule


class SigmaRule(NamedTuple):
    """How one sampling class turns sigma into the paper's t."""

    sampling_class: str
    rule: str  # the formula, for the README table and logs
    t_of: Callable[[object, torch.Tensor, int], torch.Tensor]  # (model_sampling, sigma, T) -> t


def _own_timestep(ms, sigma, T):
    return ms.timestep(sigma).float()


def _unit_timestep(ms, sigma, T):
    return ms.timestep(sigma).float() * T


def _flow(ms, sigma, T):
    return t_from_sigma_flow(sigma, T)


def _sd_schedule(ms, sigma, T):
    return t_from_sigma_sd_schedule(sigma) * (T / DEFAULT_T)


SIGMA_TO_T: tuple[SigmaRule, ...] = (
    SigmaRule("ModelSamplingCosmosRFlow", "T·σ/(σ+1) (its flow time)", _unit_timestep),
    SigmaRule("ModelSamplingDiscreteFlow", "T·σ (flow; the multiplier is ignored)", _flow),
    SigmaRule("ModelSamplingFlux", "T·σ (flow)", _flow),
    SigmaRule("StableCascadeSampling", "T·its own t in [0, 1]", _unit_timestep),
    SigmaRule("ModelSamplingDiscreteEDM", "t of the standard SD schedule at the same σ", _sd_schedule),
    SigmaRule("ModelSamplingContinuousEDM", "t of the standard SD schedule at the same σ", _sd_schedule),
    SigmaRule("ModelSamplingDiscreteDistilled", "its original training timestep (LCM: 999 … 19)",
              _own_timestep),
    SigmaRule("ModelSamplingDiscrete", "its training timestep: index of the nearest training σ",
              _own_timestep),
)
_BY_CLASS = {r.sampling_class: r for r in SIGMA_TO_T}
_FALLBACK = SigmaRule("(unknown)", "t of the standard SD schedule at the same σ", _sd_schedule)
_warned: set[str] = set()


def sigma_rule(model_sampling) -> SigmaRule:
    """The rule of the most specific known class among the sampling object's bases."""
    for cls in type(model_sampling).__mro__:
        if cls.__name__ in _BY_CLASS:
            return _BY_CLASS[cls.__name__]
    name = type(model_sampling).__name__
    if name not in _warned:
        _warned.add(name)
        logging.warning("T-LoRA: model sampling %s is not in the sigma -> t table; using the t of the standard SD "
                        "schedule at the same sigma.", name)
    return _FALLBACK


def timesteps_from_sigmas(model_sampling, sigma: torch.Tensor, T: int = DEFAULT_T) -> torch.Tensor:
    """t in [0, T] (float32, one per batch row) for the sigmas of one model call."""
    sigma = sigma.detach().reshape(-1).float()
    return sigma_rule(model_sampling).t_of(model_sampling, sigma, T).float().clamp(0, T)

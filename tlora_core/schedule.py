"""Timestep-dependent rank schedule of T-LoRA (paper Sec. 3.2, an unnumbered line) and sigma -> t conversions.

r(t) = floor((r - r_min) * ((T - t) / T) ** exponent) + r_min, with T = 1000.
t = 0 (no noise) keeps the full rank r, t -> T keeps r_min. The mask M_t of Eq. 3 keeps the FIRST r(t)
components.
exponent = 1 is the paper; other values bend the line as the reference code's `alpha_rank_scale`.
"""
from __future__ import annotations

import math

import torch

DEFAULT_T = 1000


def rank_at(t: float, rank: int, min_rank: int, exponent: float = 1.0, T: int = DEFAULT_T) -> int:
    """r(t) of Sec. 3.2 for one timestep t (clamped into [0, T])."""
    t = min(max(float(t), 0.0), float(T))
    span = rank - min_rank
    if exponent == 1.0:
        # Multiply before dividing so integer t gives the exact rational floor of the paper.
        return int(math.floor(span * (T - t) / T)) + min_rank
    return int(math.floor(span * ((T - t) / T) ** exponent)) + min_rank


def ranks_for_timesteps(t: torch.Tensor, rank: int, min_rank: int, exponent: float = 1.0,
                        T: int = DEFAULT_T) -> list[int]:
    """r(t) for every entry of a 1-D batch of timesteps, as Python ints (read once on the host)."""
    return [rank_at(v, rank, min_rank, exponent, T) for v in t.detach().reshape(-1).cpu().tolist()]


def prefix_masks(ranks: list[int], rank: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """M_t of Eq. 3 as a (batch, rank) matrix: row i holds ranks[i] ones followed by zeros."""
    cols = torch.arange(rank, device=device)
    limits = torch.tensor(ranks, device=device).unsqueeze(1)
    return (cols.unsqueeze(0) < limits).to(dtype)


def rank_masks(t: torch.Tensor, rank: int, min_rank: int, exponent: float = 1.0, T: int = DEFAULT_T,
               dtype=torch.float32) -> torch.Tensor:
    """One prefix mask per sample for a batch of timesteps t: shape (batch, rank), on t's device."""
    ranks = ranks_for_timesteps(t, rank, min_rank, exponent, T)
    return prefix_masks(ranks, rank, device=t.device, dtype=dtype)


def t_from_sigma_discrete(sigma: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """t as the index of the nearest sigma of a discrete schedule (log scale)."""
    log_sigmas = sigmas.to(sigma.device, torch.float32).log()
    dists = sigma.to(torch.float32).reshape(-1).log().unsqueeze(0) - log_sigmas.unsqueeze(1)
    return dists.abs().argmin(dim=0).to(torch.float32).reshape(sigma.shape)


def t_from_sigma_flow(sigma: torch.Tensor, T: int = DEFAULT_T) -> torch.Tensor:
    """Rectified-flow models (SD3, Flux, Lumina 2, Qwen-Image, ...): sigma is the flow time in [0, 1],
    so the paper's t is T * sigma, whatever multiplier the model feeds its own time embedding."""
    return sigma.to(torch.float32) * T


def standard_sd_sigmas(steps: int = DEFAULT_T, beta_start: float = 0.00085, beta_end: float = 0.012) -> torch.Tensor:
    """The sigmas of Stable Diffusion's training schedule ("scaled linear" betas), index t = 0..steps-1.

    sigma_t = sqrt((1 - abar_t) / abar_t), the noise-to-signal ratio that ComfyUI's samplers use.
    """
    betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, steps, dtype=torch.float64) ** 2
    abar = torch.cumprod(1.0 - betas, dim=0)
    return ((1 - abar) / abar).sqrt().to(torch.float32)


def t_from_sigma_sd_schedule(sigma: torch.Tensor) -> torch.Tensor:
    """Continuous-sigma models without training timesteps (EDM, Playground 2.5, Cosmos): t of the
    standard SD schedule at the same sigma. Sigma is the same noise-to-signal ratio in both, so
    equal sigma means an equally noisy input, which is what the paper's t measures; sigmas past the
    schedule's ends map to t = 0 and t = 999."""
    return t_from_sigma_discrete(sigma, standard_sd_sigmas())

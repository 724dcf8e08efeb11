"""Initial factors: Ortho-LoRA (paper Sec. 3.3) and the vanilla LoRA init.

Ortho-LoRA takes a random Gaussian R ~ N(0, (1/r)^2) of shape [out, in], its SVD R = U S V^T, and
starts from a slice of r singular triplets: A = V^T[sel], B = U[:, sel], S = S[sel]. The paper's
choice is the LAST r (smallest singular values); 'principal' takes the first r, 'middle' the centred
r. A has orthonormal rows and B orthonormal columns. The frozen copies A0, B0, S0 make dW = 0 at
step 0 (the LoRA trick of Eq. 5), masked or not, for every t (Eq. 6).

Randomness is drawn on the CPU from a generator seeded per layer, so a seed gives the same factors
whatever device trains afterwards.
"""
from __future__ import annotations

import zlib

import torch

from .adapter import LayerFactors
from .errors import TLoraConfigError


def layer_seed(seed: int, layer_key: str) -> int:
    """A per-layer seed that depends on the run seed and the layer's name, not on layer order."""
    return (int(seed) * 1_000_003 + zlib.crc32(layer_key.encode("utf-8"))) % (2 ** 63 - 1)


def _check_rank(rank: int, in_features: int, out_features: int, layer_key: str):
    if rank > min(in_features, out_features):
        raise TLoraConfigError(
            f"rank {rank} is larger than layer {layer_key or '?'} allows "
            f"(min(in={in_features}, out={out_features}) = {min(in_features, out_features)}); lower the rank.")


def component_slice(mode: str, rank: int, available: int) -> slice:
    """Which singular triplets an ortho init keeps (SVD order: largest first)."""
    if mode == "last":
        return slice(available - rank, available)
    if mode == "principal":
        return slice(0, rank)
    if mode == "middle":
        start = (available - rank) // 2
        return slice(start, start + rank)
    raise TLoraConfigError(f"unknown init {mode!r}; choose last, middle or principal.")


def ortho_factors(in_features: int, out_features: int, rank: int, mode: str = "last", seed: int = 0,
                  layer_key: str = "", dtype=torch.float32, device=None) -> LayerFactors:
    """Ortho-LoRA init with frozen base copies; SVD in float64 so the frames are orthonormal to 1e-12.

    R is drawn on the CPU (the same for a seed everywhere); the SVD runs on `device` (default CPU),
    because a GPU does the 560 SVDs of SD-XL in seconds where two CPU cores need minutes.
    """
    _check_rank(rank, in_features, out_features, layer_key)
    gen = torch.Generator(device="cpu").manual_seed(layer_seed(seed, layer_key))
    r_mat = torch.randn(out_features, in_features, generator=gen, dtype=torch.float64) / rank
    u, s, vh = torch.linalg.svd(r_mat.to(device), full_matrices=False)
    sel = component_slice(mode, rank, s.shape[0])
    down, up, scale = vh[sel].to(dtype), u[:, sel].to(dtype), s[sel].to(dtype)
    return LayerFactors(down=down, up=up, scale=scale,
                        base_down=down.clone(), base_up=up.clone(), base_scale=scale.clone())


def vanilla_factors(in_features: int, out_features: int, rank: int, seed: int = 0, layer_key: str = "",
                    dtype=torch.float32) -> LayerFactors:
    """Plain LoRA init: down ~ N(0, (1/r)^2), up = 0, so dW = 0 at step 0."""
    _check_rank(rank, in_features, out_features, layer_key)
    gen = torch.Generator(device="cpu").manual_seed(layer_seed(seed, layer_key))
    down = (torch.randn(rank, in_features, generator=gen, dtype=torch.float64) / rank).to(dtype)
    return LayerFactors(down=down, up=torch.zeros(out_features, rank, dtype=dtype))


def init_factors(ortho: bool, in_features: int, out_features: int, rank: int, mode: str = "last",
                 seed: int = 0, layer_key: str = "", dtype=torch.float32, device=None) -> LayerFactors:
    """The init a variant asks for (see TLoraConfig.ortho), with its tensors on `device`."""
    if ortho:
        return ortho_factors(in_features, out_features, rank, mode, seed, layer_key, dtype, device)
    return vanilla_factors(in_features, out_features, rank, seed, layer_key, dtype).to(device=device)

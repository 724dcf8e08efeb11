"""Adapter maths of one adapted Linear layer (paper Eq. 3, 5 and 6).

A layer's update at timestep t is
    dW(t) = B · diag(S ⊙ m_t) · A  -  B0 · diag(S0 ⊙ m_t) · A0          (Eq. 6)
with A = `down` [r, in], B = `up` [out, r], S = `scale` [r] (ones when absent), m_t the prefix mask of
Eq. 5, and A0, B0, S0 the frozen initial factors (absent for the non-orthogonal variants, whose up
factor starts at zero). The base weight W is never modified: the update is applied to activations,
y = W x + strength · dW(t) x: either as a dense dW(t) added to W for a batch that shares one t
(delta_weight), or on activations with one mask per sample (masked_delta).
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional

import torch
import torch.nn.functional as F

from .errors import TLoraFormatError

TENSOR_FIELDS = ("down", "up", "scale", "base_down", "base_up", "base_scale")
TRAINABLE_FIELDS = ("down", "up", "scale")


@dataclass
class LayerFactors:
    """The factors of one adapted layer. `base_*` are frozen copies of the initial factors."""

    down: torch.Tensor
    up: torch.Tensor
    scale: Optional[torch.Tensor] = None
    base_down: Optional[torch.Tensor] = None
    base_up: Optional[torch.Tensor] = None
    base_scale: Optional[torch.Tensor] = None

    def __post_init__(self):
        r = self.down.shape[0]
        problems = []
        if self.down.dim() != 2 or self.up.dim() != 2 or self.up.shape[1] != r:
            problems.append(f"down {tuple(self.down.shape)} and up {tuple(self.up.shape)} are not [r, in] and [out, r]")
        if self.scale is not None and tuple(self.scale.shape) != (r,):
            problems.append(f"scale has shape {tuple(self.scale.shape)}, expected ({r},)")
        has_base = [t is not None for t in (self.base_down, self.base_up)]
        if any(has_base) and not all(has_base):
            problems.append("only one of base_down / base_up is present")
        if all(has_base) and (self.base_down.shape != self.down.shape or self.base_up.shape != self.up.shape):
            problems.append("base factors differ in shape from the trained factors")
        if self.base_scale is not None and self.base_scale.shape != (r,):
            problems.append(f"base_scale has shape {tuple(self.base_scale.shape)}, expected ({r},)")
        if problems:
            raise TLoraFormatError("inconsistent layer factors: " + "; ".join(problems) + ".")

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def in_features(self) -> int:
        return self.down.shape[1]

    @property
    def out_features(self) -> int:
        return self.up.shape[0]

    @property
    def has_base(self) -> bool:
        return self.base_down is not None

    def tensors(self) -> dict[str, torch.Tensor]:
        """The present tensors by field name."""
        return {name: getattr(self, name) for name in TENSOR_FIELDS if getattr(self, name) is not None}

    def to(self, device=None, dtype=None) -> "LayerFactors":
        """A copy on another device / dtype (no copy for tensors already there)."""
        return LayerFactors(**{f.name: (None if getattr(self, f.name) is None
                                        else getattr(self, f.name).to(device=device, dtype=dtype))
                               for f in fields(self)})


def _gains(scale: Optional[torch.Tensor], mask: Optional[torch.Tensor], dtype) -> Optional[torch.Tensor]:
    """S ⊙ m as (k,) or (batch, k); None when both are absent (all ones)."""
    if scale is None:
        return None if mask is None else mask.to(dtype)
    scale = scale.to(dtype)
    return scale if mask is None else scale * mask.to(dtype)


def _low_rank(x, down, up, gains):
    """up · diag(gains) · down · x for x [batch, ..., in]; gains is (k,), (batch, k) or None."""
    h = F.linear(x, down)
    if gains is not None:
        if gains.dim() == 2:
            gains = gains.reshape(gains.shape[0], *([1] * (h.dim() - 2)), gains.shape[1])
        h = h * gains
    return F.linear(h, up)


def masked_delta(x: torch.Tensor, f: LayerFactors, mask: Optional[torch.Tensor] = None,
                 active: Optional[int] = None) -> torch.Tensor:
    """dW(t) · x of Eq. 6 for a batch: mask is None (full rank), (r,) or (batch, r), one row per sample.

    `active` is the largest rank any row keeps: the masks are prefix masks, so components past it
    are zero for every row and are skipped, which makes high-noise steps cheaper. The trained and the
    frozen products run as two identical passes, so the result is exactly zero at initialisation.
    """
    k = f.rank if active is None else active
    mask = None if mask is None else mask[..., :k]
    dtype = x.dtype
    out = _low_rank(x, f.down[:k].to(dtype), f.up[:, :k].to(dtype),
                    _gains(None if f.scale is None else f.scale[:k], mask, dtype))
    if f.has_base:
        out = out - _low_rank(x, f.base_down[:k].to(dtype), f.base_up[:, :k].to(dtype),
                              _gains(None if f.base_scale is None else f.base_scale[:k], mask, dtype))
    return out


def delta_weight(f: LayerFactors, mask: Optional[torch.Tensor] = None, active: Optional[int] = None,
                 dtype=torch.float32) -> torch.Tensor:
    """The dense dW(t) [out, in] of Eq. 6 for one mask row (None = full rank), on the factors' device.

    Gradients flow to the factors. When a whole batch shares one t (the usual case: CFG halves share
    their sigma) adding this to W costs out*in*k, far less than the per-token path of masked_delta.
    The trained and frozen products are computed the same way, so dW is exactly zero at init.
    """
    if mask is not None and mask.numel() != mask.shape[-1]:
        raise ValueError(f"delta_weight takes one mask row, (r,) or (1, r), got shape {tuple(mask.shape)}; "
                         f"use masked_delta for a batch whose samples have different t.")
    k = f.rank if active is None else active
    row = None if mask is None else mask.reshape(-1)[:k]

    def product(down, up, scale):
        g = _gains(None if scale is None else scale[:k], row, dtype)
        up = up[:, :k].to(dtype)
        return (up if g is None else up * g) @ down[:k].to(dtype)

    dw = product(f.down, f.up, f.scale)
    if f.has_base:
        dw = dw - product(f.base_down, f.base_up, f.base_scale)
    return dw

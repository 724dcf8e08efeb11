"""Adapter maths of one adapted Linear layer (paper Eq. 3, 5 and 6).

A layer's update at timestep t is
    dW(t) = B · diag(S ⊙ m_t) · A  -  B0 · diag(S0 ⊙ m_t) · A0          (Eq. 6)
with A = `down` [r, in], B = `up` [out, r], S = `scale` [r] (ones when absent), m_t the prefix mask of
Eq. 3 (keeping r(t) components, Sec. 3.2), and A0, B0, S0 the frozen initial factors (absent for the
non-orthogonal variants, whose up factor starts at zero; subtracting them is the LoRA trick of Eq. 5).
The base weight W is never modified: the update is applied to activations, y = W x + strength · dW(t) x: either as a dense dW(t) added to W for a batch that shares one t
(delta_weight), or on activations (masked_delta, one mask per sample), whichever costs less
(activations_cheaper). Sampling uses the stacked form (stacked_factors: trained and frozen products
in one GEMM); training runs them as two passes so that the frozen one needs no gradients, or, where
the layer has many rows, folds the frozen product onto the weight (frozen_product, no gradient) and
runs only the trained one on activations (trained_delta; training_path picks). The stacked and
two-pass forms are exactly zero at initialisation; the folded one to the rounding of W - B0 S0 M A0.
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


def stacked_factors(f: LayerFactors, active: Optional[int] = None,
                    dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """(left [out, c*k], right [c*k, in]) with dW of the first k = `active` components = left @ right.

    Without frozen factors c = 1: left = B diag(S), right = A. With them c = 2 and Eq. 6 is split as
        B S A - B0 S0 A0 = (B S - B0 S0) A + B0 S0 (A - A0),
    component j giving the columns 2j (B S - B0 S0)_j, 2j+1 (B0 S0)_j of left and the rows 2j A_j,
    2j+1 (A - A0)_j of right. While the factors equal their init every product term is exactly zero, so
    dW is exactly 0 at step 0 whatever the summation order of the matmul (one GEMM, not two that
    cancel), and a trained T-LoRA's small update is not the difference of two large products. The
    layout is interleaved so that the first k components are a prefix: left[:, :c*k], right[:c*k].
    Differences are taken in float32 (or the wider `dtype`), then cast to `dtype`.
    """
    k = f.rank if active is None else active
    work = torch.promote_types(torch.float32, dtype)

    def scaled(up, scale):
        up = up[:, :k].to(work)
        return up if scale is None else up * scale[:k].to(work)

    up, down = scaled(f.up, f.scale), f.down[:k].to(work)
    if not f.has_base:
        return up.to(dtype), down.to(dtype)
    up0 = scaled(f.base_up, f.base_scale)
    left = torch.stack([up - up0, up0], dim=2).reshape(up.shape[0], 2 * k)
    right = torch.stack([down, down - f.base_down[:k].to(work)], dim=1).reshape(2 * k, down.shape[1])
    return left.to(dtype), right.to(dtype)


def stack_width(f: LayerFactors) -> int:
    """Columns of `left` per component: 2 with frozen factors, else 1."""
    return 2 if f.has_base else 1


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


def stacked_delta(x: torch.Tensor, left: torch.Tensor, right: torch.Tensor, width: int,
                  mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """left · diag(mask) · right · x for x [batch, ..., in], from stacked_factors' output.

    mask: None, (k,) or (batch, k) over the k components in left/right; each component's `width`
    stacked columns share its entry.
    """
    gains = None if mask is None else mask.to(x.dtype).repeat_interleave(width, dim=-1)
    return _low_rank(x, right, left, gains)


def masked_delta(x: torch.Tensor, f: LayerFactors, mask: Optional[torch.Tensor] = None,
                 active: Optional[int] = None) -> torch.Tensor:
    """dW(t) · x of Eq. 6 for a batch: mask is None (full rank), (r,) or (batch, r), one row per sample.

    `active` is the largest rank any row keeps: the masks are prefix masks, so components past it
    are zero for every row and are skipped, which makes high-noise steps cheaper. The trained and the
    frozen products run as two identical passes, so the result is exactly zero at initialisation; the
    frozen pass needs no factor gradients, which makes this the cheaper form to train through (the
    stacked form would back-propagate into both halves of its GEMM).
    """
    out = trained_delta(x, f, mask, active)
    if f.has_base:
        k = f.rank if active is None else active
        dtype, mask = x.dtype, None if mask is None else mask[..., :k]
        out = out - _low_rank(x, f.base_down[:k].to(dtype), f.base_up[:, :k].to(dtype),
                              _gains(None if f.base_scale is None else f.base_scale[:k], mask, dtype))
    return out


def trained_delta(x: torch.Tensor, f: LayerFactors, mask: Optional[torch.Tensor] = None,
                  active: Optional[int] = None) -> torch.Tensor:
    """B · diag(S ⊙ m_t) · A · x: the trained product of Eq. 6 alone (masked_delta's first pass), for a
    layer whose frozen product is already on its weight (frozen_product)."""
    k = f.rank if active is None else active
    mask = None if mask is None else mask[..., :k]
    dtype = x.dtype
    return _low_rank(x, f.down[:k].to(dtype), f.up[:, :k].to(dtype),
                     _gains(None if f.scale is None else f.scale[:k], mask, dtype))


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
    dw = _dense_product(f.down, f.up, f.scale, mask, f.rank if active is None else active, dtype)
    if f.has_base:
        dw = dw - frozen_product(f, mask, active, dtype)
    return dw


def frozen_product(f: LayerFactors, mask: Optional[torch.Tensor] = None, active: Optional[int] = None,
                   dtype=torch.float32) -> torch.Tensor:
    """B0 · diag(S0 ⊙ m_t) · A0 [out, in], the frozen product of Eq. 6 for one mask row. Its factors never
    train, so in training it can sit on the layer's weight (W - strength · this, no gradient) while the
    trained product stays on the activations (trained_delta)."""
    if not f.has_base:
        raise ValueError("frozen_product needs frozen factors (base_down / base_up); this layer has none.")
    return _dense_product(f.base_down, f.base_up, f.base_scale, mask, f.rank if active is None else active, dtype)


def _dense_product(down, up, scale, mask, k: int, dtype) -> torch.Tensor:
    """up[:, :k] · diag(scale ⊙ mask row) · down[:k], dense [out, in]."""
    row = None if mask is None else mask.reshape(-1)[:k]
    g = _gains(None if scale is None else scale[:k], row, dtype)
    up = up[:, :k].to(dtype)
    return (up if g is None else up * g) @ down[:k].to(dtype)


def path_costs(rows: int, in_features: int, out_features: int, active: int, frozen_copies: bool,
               with_grad: bool) -> tuple[int, int]:
    """FLOPs of adding dW to one layer (weight path, activation path) for one model call.

    rows: rows of the layer's input (batch x tokens); active: components kept (k); frozen_copies: the
    factors carry B0, S0, A0 (c = 2 products, else 1). With io = in·out and s = rows·(in + out):
    - sampling (stacked form, one GEMM of width c·k either way): weight 2·c·k·io, activations 2·c·k·s;
    - training (two passes; only the trained one needs factor gradients): weight 2·c·k·io forward, the
      dense weight gradient 2·rows·io and the factor gradients 4·k·io; activations 2·c·k·s forward,
      4·k·s for the trained pass's input and factor gradients, 2·k·s for the frozen pass's input gradient.
    """
    c = 2 if frozen_copies else 1
    io, s = in_features * out_features, rows * (in_features + out_features)
    if not with_grad:
        return 2 * c * active * io, 2 * c * active * s
    return (2 * c * active * io + 2 * rows * io + 4 * active * io,
            2 * c * active * s + 4 * active * s + 2 * (c - 1) * active * s)


def split_cost(rows: int, in_features: int, out_features: int, active: int) -> int:
    """FLOPs of a training step's dW for one layer with frozen factors when the frozen product is folded
    onto the weight copy ComfyUI makes anyway (2·k·io, no gradient; the layer's own GEMMs run with W - F
    instead of W at the same cost) and only the trained product runs on activations (2·k·s forward,
    4·k·s backward; as path_costs)."""
    return 2 * active * in_features * out_features + 6 * active * rows * (in_features + out_features)


def training_path(rows: int, in_features: int, out_features: int, active: int, frozen_copies: bool) -> str:
    """The cheapest way to add dW(t) to one layer in a training step whose rows share one t: 'weight'
    (dense dW with gradients), 'split' (frozen product on the weight, trained one on activations; only
    with frozen factors) or 'activations' (both products on activations, masked_delta)."""
    weight, activations = path_costs(rows, in_features, out_features, active, frozen_copies, True)
    costs = {"activations": activations, "weight": weight}
    if frozen_copies:
        costs["split"] = split_cost(rows, in_features, out_features, active)
    return min(costs, key=costs.get)


def activations_cheaper(rows: int, in_features: int, out_features: int, active: int, frozen_copies: bool,
                        with_grad: bool) -> bool:
    """Whether adding dW·x to a layer's output costs fewer FLOPs than adding dW to its weight
    (path_costs). Layers with few rows (cross-attention keys/values on 77 text tokens, the deepest
    UNet blocks) are cheaper on activations, and in training most layers are: the weight path needs
    the dense weight gradient, a GEMM as large as the layer's own."""
    weight, activations = path_costs(rows, in_features, out_features, active, frozen_copies, with_grad)
    return activations < weight

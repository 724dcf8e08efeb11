"""What every runtime of a T-LoRA shares per model call: the rank masks of the call in progress and
the body of the forward hook that adds strength * dW(t_i) x_i to an adapted layer's output.

Both runtimes use these: ComfyUI's (trainer/runtime.py, masks from the sigmas of an APPLY_MODEL call)
and sd-scripts' (tlora_core/kohya.py, masks from the UNet's timestep argument). How each one learns
t and how long a call's masks stay in force differ with the host; the masks and the hook body do not.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from .errors import TLoraError
from .schedule import prefix_masks, ranks_for_timesteps

# dW(t) x for an input x, per-row masks (None: every row keeps the first `active` components), active
DeltaFn = Callable[[torch.Tensor, Optional[torch.Tensor], int], torch.Tensor]


class CallMasks:
    """The rank masks of one model call: one prefix mask row per sample (r(t) of Sec. 3.2, mask of Eq. 3).

    Worked out once per call and read by every adapted layer.
    """

    def __init__(self, ranks: list[int], masks: torch.Tensor):
        self.ranks = ranks
        self.masks = masks  # (batch, r) on the call's device
        self.uniform = len(set(ranks)) == 1  # every row shares one t
        self.active = max(ranks)  # components any row keeps (prefix masks)

    @classmethod
    def for_timesteps(cls, t: torch.Tensor, rank: int, min_rank: int, exponent: float, max_timestep: int,
                      device=None) -> "CallMasks":
        """Masks for a batch of timesteps t (one per sample, 0..T)."""
        ranks = ranks_for_timesteps(t, rank, min_rank, exponent, max_timestep)
        return cls(ranks, prefix_masks(ranks, rank, device=device))

    def per_row(self, x: torch.Tensor, layer_key: str) -> Optional[torch.Tensor]:
        """(rows of x, active) masks on x's device, or None when every row shares one t (then the first
        `active` components are all kept). Layers that fold more rows into the batch than the call has
        samples (e.g. attention over several heads or frames) repeat each sample's mask."""
        if self.uniform:
            return None
        masks = self.masks
        if x.shape[0] != masks.shape[0]:
            if x.shape[0] % masks.shape[0]:
                raise TLoraError(f"T-LoRA layer {layer_key}: a batch of {x.shape[0]} rows cannot be matched to "
                                 f"{masks.shape[0]} timesteps.")
            masks = masks.repeat_interleave(x.shape[0] // masks.shape[0], dim=0)
        return masks[:, :self.active].to(x.device)


def add_delta(output: torch.Tensor, x: torch.Tensor, call: CallMasks, strength: float, delta: DeltaFn,
              layer_key: str, rows: Optional[tuple[int, int]] = None) -> torch.Tensor:
    """The forward-hook body: output + strength * dW(t_i) x_i, row i with its own t.

    `rows` = (offset, size) adds it to a slice of the outputs only (a fused weight such as Flux's qkv).
    Without autograd (sampling) the slice is added in place: the output is the layer's own fresh result,
    which nothing else holds yet, and a fused Linear with several slices adapted (Flux's linear1: 21504
    outputs) would otherwise copy its whole output once per slice. With autograd it is added to a copy.
    """
    d = delta(x, call.per_row(x, layer_key), call.active) * strength
    if rows is None:
        return output + d.to(output.dtype)
    offset, size = rows
    out = output.clone() if torch.is_grad_enabled() else output
    out[..., offset:offset + size] += d.to(output.dtype)
    return out

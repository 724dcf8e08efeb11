"""The optimisers of the two reference recipes, one optimisation step, and the optimiser's state for resume.

AdamW is the paper's (SD-XL); Prodigy the reference FLUX code's (`prodigyopt`, lr 1.0, gradients clipped to
norm 1.0). `tlora_core.families.OPTIMIZERS` holds each one's learning rate, weight decay and clipping;
this module builds them, steps them (with fp16's GradScaler where training computes in fp16) and turns
their state into plain tensors and numbers that the resume sidecar stores and gives back exactly.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Optional

import torch

from ..tlora_core.errors import TLoraError

BETAS = (0.9, 0.999)  # both reference recipes
EPS = 1e-8
# Values Prodigy keeps per parameter group and changes every step (its running estimate of the step size d);
# AdamW keeps everything per parameter.
GROUP_STATE = {"adamw": (), "prodigy": ("d", "d_max", "d_numerator", "d_denom", "d_hat", "k")}
PRODIGY_LOW_LR = 0.1  # below this Prodigy barely moves (the reference warns; a silent no-op is worse)


def prodigy_class():
    """prodigyopt.Prodigy, or a clear error naming the command that installs it into this Python."""
    try:
        import prodigyopt
    except ImportError:
        raise TLoraError(f"the Prodigy optimiser (the reference FLUX recipe's) needs the 'prodigyopt' package, which "
                         f"is not installed. Install it with: {sys.executable} -m pip install prodigyopt "
                         f"(or choose optimizer 'adamw').") from None
    return prodigyopt.Prodigy


def build_optimizer(name: str, params: list[torch.Tensor], learning_rate: float,
                    weight_decay: float) -> torch.optim.Optimizer:
    """The optimiser `name` ("adamw" or "prodigy") over `params`, with the reference recipes' settings."""
    if name == "adamw":
        return torch.optim.AdamW(params, lr=learning_rate, betas=BETAS, weight_decay=weight_decay, eps=EPS)
    if name == "prodigy":
        if learning_rate < PRODIGY_LOW_LR:  # e.g. AdamW's 1e-4 kept from an older workflow: a silent no-op
            raise TLoraError(f"learning_rate {learning_rate:g} with the Prodigy optimiser would barely train: "
                             f"Prodigy finds its own step size and wants a learning rate near 1.0. Set "
                             f"learning_rate 0 (the recipe's 1.0), or choose optimizer 'adamw' for a small one.")
        return prodigy_class()(params, lr=learning_rate, betas=BETAS, beta3=None, weight_decay=weight_decay,
                               eps=EPS, decouple=True, use_bias_correction=True, safeguard_warmup=True)
    raise TLoraError(f"unknown optimizer {name!r}; choose adamw or prodigy.")


def grad_scaler(device: torch.device, compute_dtype: Optional[torch.dtype]) -> Optional[torch.amp.GradScaler]:
    """A GradScaler for fp16 compute (its small range underflows gradients otherwise); None for the rest."""
    if compute_dtype != torch.float16:
        return None
    return torch.amp.GradScaler(device.type)


def optimizer_step(optimizer: torch.optim.Optimizer, loss: torch.Tensor, params: list[torch.Tensor],
                   max_grad_norm: float, scaler: Optional[torch.amp.GradScaler], backward):
    """Backward (through `backward(loss)`), clip the gradients' total norm to `max_grad_norm` (0: no
    clipping) and step; with a scaler the loss is scaled first and the gradients unscaled before clipping."""
    optimizer.zero_grad(set_to_none=True)
    backward(scaler.scale(loss) if scaler is not None else loss)
    if scaler is not None:
        scaler.unscale_(optimizer)
    if max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()


@dataclass
class OptimizerState:
    """An optimiser's state by parameter name, as plain values: what the resume sidecar stores."""

    name: str                                                    # "adamw" / "prodigy"
    tensors: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # param -> key -> tensor (CPU)
    numbers: dict[str, dict[str, float]] = field(default_factory=dict)         # param -> key -> int / float
    on_cpu: list[str] = field(default_factory=list)   # "<param>.<key>" tensors the optimiser keeps on the CPU
    group: dict[str, float] = field(default_factory=dict)   # GROUP_STATE values of the first group
    scaler: dict = field(default_factory=dict)               # GradScaler.state_dict(), fp16 only

    def to_record(self) -> dict:
        """The JSON-able part (everything but the tensors)."""
        return {"name": self.name, "numbers": self.numbers, "on_cpu": self.on_cpu, "group": self.group,
                "scaler": self.scaler}


def capture_optimizer(name: str, optimizer: torch.optim.Optimizer, params: dict[str, torch.Tensor],
                      scaler: Optional[torch.amp.GradScaler]) -> OptimizerState:
    """A CPU copy of `optimizer`'s state; `params` maps each parameter's name to the tensor."""
    # GradScaler.state_dict() holds Python numbers only (scale, growth tracker and its settings)
    state = OptimizerState(name, scaler=dict(scaler.state_dict()) if scaler is not None else {})
    for pname, param in params.items():
        for key, value in optimizer.state.get(param, {}).items():
            if torch.is_tensor(value):
                state.tensors.setdefault(pname, {})[key] = value.detach().to("cpu", copy=True).contiguous()
                if value.device != param.device:
                    state.on_cpu.append(f"{pname}.{key}")
            else:
                state.numbers.setdefault(pname, {})[key] = value
    group = optimizer.param_groups[0]
    state.group = {key: group[key] for key in GROUP_STATE[name] if key in group}
    return state


def restore_optimizer_state(optimizer: torch.optim.Optimizer, params: dict[str, torch.Tensor],
                            state: OptimizerState, scaler: Optional[torch.amp.GradScaler]):
    """Put a captured state back on the parameters of the same names (and the group's step-size estimate)."""
    for pname, param in params.items():
        values = {key: t.to("cpu" if f"{pname}.{key}" in state.on_cpu else param.device).clone()
                  for key, t in state.tensors.get(pname, {}).items()}
        values.update(state.numbers.get(pname, {}))
        if values:
            optimizer.state[param] = values
    for group in optimizer.param_groups:
        group.update(state.group)
    if scaler is not None and state.scaler:
        scaler.load_state_dict(state.scaler)


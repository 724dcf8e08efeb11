"""The Train node's `memory` input: a card size (or 'auto') turned into the run's memory settings.

The presets are data in the family table (`tlora_core.families.MEMORY_PRESETS`, filled from
`benchmarks/memory_estimate.py`); this module only picks one and applies it. A preset turns gradient
checkpointing on and caps the training size; it never turns checkpointing off or raises a size the user
set lower. An fp8 base cannot be applied here (the node must not change the model it receives): when
the preset assumes one and the model is loaded wider, the log says how to load it in fp8.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import torch

from ..tlora_core.errors import TLoraConfigError
from ..tlora_core.families import MEMORY_CARDS, Family, MemoryPreset, memory_table

OFF, AUTO = "off", "auto"
MEMORY_CHOICES = (OFF, AUTO, *(f"{card} GB" for card in MEMORY_CARDS))
GIB = 2 ** 30


@dataclass(frozen=True)
class MemoryPlan:
    """The run's memory settings after the preset, and the line the log gets."""

    gradient_checkpointing: bool
    resolution: int  # as the node's input: 0 = the recipe's size
    note: str


def card_for(choice: str, available_gib: Optional[float], as_loaded_gib: float) -> Optional[int]:
    """The card whose preset applies: the one named, or for 'auto' the largest card that the available
    memory holds (the smallest when it holds none); None when 'auto' finds room for the run as loaded."""
    if choice != AUTO:
        return int(choice.split()[0])
    if available_gib >= as_loaded_gib + 1.0:  # the same 1 GiB the estimator leaves to the CUDA context
        return None
    return max([c for c in MEMORY_CARDS if c <= available_gib + 0.5] or [MEMORY_CARDS[0]])


def plan_memory(choice: str, family: Family, gradient_checkpointing: bool, resolution: int,
                base_dtype: torch.dtype, device: torch.device, available_gib: Optional[float] = None,
                config_classes: tuple[str, ...] = ()) -> MemoryPlan:
    """Apply the `memory` choice to the node's checkpointing and resolution. available_gib: memory the
    device offers for training ('auto' on a GPU reads it from ComfyUI when not given); config_classes: the
    model's config class and its bases, most specific first (some have presets of their own)."""
    if choice not in MEMORY_CHOICES:
        raise TLoraConfigError(f"memory {choice!r} is not a preset; choose one of {', '.join(MEMORY_CHOICES)}.")
    unchanged = MemoryPlan(gradient_checkpointing, resolution, "")
    if choice == OFF:
        return unchanged
    table = memory_table(family.name, config_classes)
    if table is None:
        return _note(unchanged, f"memory {choice}: no presets for the {family.name} family yet; settings unchanged.")
    if choice == AUTO:
        if device.type == "cpu":
            return _note(unchanged, "memory auto: training on the CPU (the presets are for GPU memory); "
                                    "settings unchanged.")
        available_gib = available_memory_gib(device) if available_gib is None else available_gib
    card = card_for(choice, available_gib, table.as_loaded_gib)
    if card is None:
        return _note(unchanged, f"memory auto: {available_gib:.1f} GiB available on {device}, more than "
                                f"{family.name} needs as loaded ({table.as_loaded_gib:.1f} GiB); settings unchanged.")
    return _apply(table.cards[card], card, choice, family, gradient_checkpointing, resolution, base_dtype,
                  available_gib)


def _apply(preset: MemoryPreset, card: int, choice: str, family: Family, gradient_checkpointing: bool,
           resolution: int, base_dtype: torch.dtype, available_gib: Optional[float]) -> MemoryPlan:
    native = family.recipe.resolution
    size = resolution or native
    capped = preset.max_resolution and size > preset.max_resolution
    plan = MemoryPlan(gradient_checkpointing or preset.gradient_checkpointing,
                      preset.max_resolution if capped else resolution, "")
    why = f" ({available_gib:.1f} GiB available)" if choice == AUTO else ""
    parts = [f"memory {choice}: the {card} GB preset of {family.name}{why}:",
             f"gradient checkpointing {'on' if plan.gradient_checkpointing else 'off'},",
             f"{plan.resolution or native} px" + (f" (not {size})" if capped else "") + "."]
    if preset.fp8_base and _bits(base_dtype) > 8:
        parts.append(f"It assumes an fp8 base, and this model is loaded as {str(base_dtype).removeprefix('torch.')}: "
                     "load it with weight_dtype fp8_e4m3fn (Load Diffusion Model) to fit.")
    if not preset.fits:
        parts.append(f"Even so one step needs more than {card} GB by the estimate; ComfyUI will offload weights "
                     "and training runs slower.")
    return _note(plan, " ".join(parts))


def _bits(dtype: torch.dtype) -> int:
    return torch.finfo(dtype).bits if dtype.is_floating_point else torch.iinfo(dtype).bits


def _note(plan: MemoryPlan, note: str) -> MemoryPlan:
    logging.info("T-LoRA: %s", note)
    return MemoryPlan(plan.gradient_checkpointing, plan.resolution, note)


def available_memory_gib(device: torch.device) -> float:
    """Free device memory plus what ComfyUI's loaded models hold there (it unloads them when training
    needs the room), in GiB."""
    import comfy.model_management as mm

    held = sum(m.model_loaded_memory() for m in mm.current_loaded_models if m.device == device)
    return (mm.get_free_memory(device) + held) / GIB

"""Exact resume: the state beside each saved T-LoRA that lets a later run continue it bit for bit.

Every file the trainer saves gets a sidecar `<name>.safetensors.state` (trainer.files.state_path), a
safetensors file holding what the T-LoRA file itself does not:
- `<layer>.tlora_<field>`: every factor in float32 as trained (the file may hold 16-bit values);
- `<layer>.tlora_<field>.<key>`: the optimiser's tensors of each trained factor (AdamW: `step`, `exp_avg`,
  `exp_avg_sq`; Prodigy: `s`, `p0`, `exp_avg`, `exp_avg_sq`);
- `rng`: the state of the sampler's generator (timesteps, noise, crops, image picks) after the last step;
- `losses`: the loss of every step so far (float64, as the trainer reports them);
metadata: `tlora.state_version`, `tlora.steps_done`, `tlora.storage`, and `tlora.optimizer` (JSON: the
optimiser's name, its per-factor numbers, Prodigy's step-size estimate, the fp16 GradScaler's state).
Version 1 sidecars (AdamW only, no `tlora.optimizer`) still resume.
The sidecar is written first and the T-LoRA file second, each atomically; when the second write fails
the sidecar is removed again, and a sidecar left alone by a crash keeps its file name taken.
A sidecar is only used when rounding its float32 factors the way the file stores them gives exactly
the factors read from the file, so a state never continues a T-LoRA it does not belong to.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import save_file

from ..tlora_core.adapter import TRAINABLE_FIELDS, LayerFactors
from ..tlora_core.config import TLoraConfig
from ..tlora_core.errors import TLoraError, TLoraFormatError
from ..tlora_core.format import (KEY_MARK, STORAGE_DTYPES, TLora, from_state_dict, read_safetensors, save_tlora,
                                 stores_residuals, to_state_dict, write_new_file)
from .files import state_path
from .optim import OptimizerState

STATE_VERSION = 2
V1_ON_CPU = "step"  # version 1 (AdamW): its `step` counts lived on the CPU


@dataclass
class TrainState:
    """What continuing a run needs besides the file: exact factors, optimiser state, RNG, losses."""

    steps_done: int
    factors: dict[str, LayerFactors]
    optimizer: OptimizerState  # by factor name `<layer>.tlora_<field>`
    rng: torch.Tensor  # torch.Generator.get_state() of the CPU generator
    losses: list[float] = field(default_factory=list)


def trainable_tensors(tlora: TLora) -> dict[str, torch.Tensor]:
    """The factors the optimiser updates, by their name in the file (`<layer>.tlora_<field>`)."""
    return {f"{layer}{KEY_MARK}{name}": getattr(f, name) for layer, f in tlora.layers.items()
            for name in TRAINABLE_FIELDS if getattr(f, name) is not None and getattr(f, name).requires_grad}


def capture(tlora: TLora, optimizer: OptimizerState, rng: torch.Tensor, losses: list[float],
            steps_done: int) -> TrainState:
    """A CPU snapshot of the run after `steps_done` steps (the optimiser's part captured by trainer.optim)."""
    factors = {k: LayerFactors(**{n: t.detach().to("cpu", torch.float32, copy=True) for n, t in f.tensors().items()})
               for k, f in tlora.layers.items()}
    return TrainState(steps_done, factors, optimizer, rng.clone(), list(losses))


def usable_optimizer_state(state: TrainState, optimizer: str) -> Optional[OptimizerState]:
    """The saved optimiser state when it is `optimizer`'s, else None with a warning (another optimiser's
    state cannot continue this one: it starts fresh)."""
    if state.optimizer.name == optimizer:
        return state.optimizer
    logging.warning("T-LoRA: the resume state holds %s's state but this run uses %s; the optimiser starts fresh, "
                    "so the resumed run will not equal an uninterrupted one.", state.optimizer.name, optimizer)
    return None


def save_with_state(snapshot: TLora, state: TrainState, path: Path, storage: str) -> Path:
    """Write the state sidecar, then the T-LoRA file; neither overwrites anything."""
    tensors = to_state_dict(TLora(snapshot.config, state.factors), torch.float32)
    for name, values in state.optimizer.tensors.items():
        tensors.update({f"{name}.{key}": t.contiguous() for key, t in values.items()})
    tensors["rng"] = state.rng.contiguous()
    tensors["losses"] = torch.tensor(state.losses, dtype=torch.float64)
    metadata = {"tlora.state_version": str(STATE_VERSION), "tlora.steps_done": str(state.steps_done),
                "tlora.storage": storage, "tlora.optimizer": json.dumps(state.optimizer.to_record())}
    sidecar = write_new_file(state_path(path), lambda tmp: save_file(tensors, tmp, metadata=metadata))
    try:
        return save_tlora(snapshot, path, storage=storage)
    except BaseException:
        sidecar.unlink(missing_ok=True)  # written a moment ago by this call: no file without its state
        raise


def read_state(path: Path, config: TLoraConfig) -> tuple[TrainState, str]:
    """The sidecar at `path` (of a T-LoRA with `config`) and the storage its T-LoRA file uses; errors name the
    file and the fix."""
    tensors, metadata = read_safetensors(path)
    fix = f"Delete {path} to resume with a fresh optimiser (the run then differs from an uninterrupted one)."
    try:
        version, steps_done = int(metadata["tlora.state_version"]), int(metadata["tlora.steps_done"])
        storage = metadata["tlora.storage"]
        rng, losses = tensors.pop("rng"), tensors.pop("losses").tolist()
    except (KeyError, ValueError) as exc:
        raise TLoraFormatError(f"{path} is not a T-LoRA resume state (missing or bad {exc}). {fix}") from None
    if version > STATE_VERSION or storage not in STORAGE_DTYPES:
        raise TLoraFormatError(f"{path} was written by a newer version of this pack. Update the pack, or: {fix}")
    optimizer = _optimizer_record(metadata, version, path, fix)
    # `<layer>.tlora_<field>.<key>`: an optimiser tensor (a factor's own name has no dot after its mark)
    for key in [k for k in tensors if KEY_MARK in k and "." in k.rpartition(KEY_MARK)[2]]:
        name, _, part = key.rpartition(KEY_MARK)
        field_name, _, opt_key = part.partition(".")
        optimizer.tensors.setdefault(f"{name}{KEY_MARK}{field_name}", {})[opt_key] = tensors.pop(key)
        if version == 1 and opt_key == V1_ON_CPU:
            optimizer.on_cpu.append(f"{name}{KEY_MARK}{field_name}.{opt_key}")
    try:
        factors = from_state_dict(tensors, config, str(path)).layers
    except TLoraFormatError as exc:
        raise TLoraFormatError(f"{exc} {fix}") from None
    return TrainState(steps_done, factors, optimizer, rng, losses), storage


def _optimizer_record(metadata: dict, version: int, path: Path, fix: str) -> OptimizerState:
    """The optimiser part of a sidecar's metadata (tensors are added by the caller)."""
    if version == 1:
        return OptimizerState("adamw")
    try:
        record = json.loads(metadata["tlora.optimizer"])
        return OptimizerState(record["name"], numbers=record["numbers"], on_cpu=list(record["on_cpu"]),
                              group=record["group"], scaler=record["scaler"])
    except (KeyError, TypeError, ValueError) as exc:
        raise TLoraFormatError(f"{path} holds no readable optimiser state (missing or bad {exc}). {fix}") from None


def belongs_to(state: TrainState, storage: str, tlora: TLora) -> bool:
    """True when the sidecar's factors, rounded as the file stores them, are exactly the file's factors."""
    if state.factors.keys() != tlora.layers.keys():
        return False
    dtype = STORAGE_DTYPES[storage]
    rounded = to_state_dict(TLora(tlora.config, state.factors), dtype)
    rebuilt = from_state_dict(rounded, tlora.config, residuals=stores_residuals(dtype)).layers
    for key, f in tlora.layers.items():
        have, want = f.tensors(), rebuilt[key].tensors()
        if have.keys() != want.keys() or any(not torch.equal(have[n].float().cpu(), want[n]) for n in have):
            return False
    return True


def state_for(resume: TLora, steps_done: int) -> Optional[TrainState]:
    """The saved state that continues `resume` exactly, or None (with a warning) when there is none."""
    origin = resume.origin
    sidecar = None if origin is None else state_path(origin)
    if sidecar is None or not sidecar.is_file():
        where = f"{origin}" if origin is not None else "this T-LoRA (not read from a file of this pack)"
        logging.warning("T-LoRA: %s has no optimiser state (%s); the optimiser starts fresh, so the resumed run "
                        "will not equal an uninterrupted one.", where,
                        f"no {sidecar.name} beside it" if sidecar is not None else "no resume state")
        return None
    state, storage = read_state(sidecar, resume.config)
    if state.steps_done != steps_done or not belongs_to(state, storage, resume):
        logging.warning("T-LoRA: %s does not belong to %s (steps or factors differ; was the file replaced?); "
                        "the optimiser starts fresh.", sidecar, origin)
        return None
    return state


def check_family_and_image(resume: TLora, base_model: str, image_id: str):
    """Refuse to continue a T-LoRA on another model family or other training images, naming both."""
    was = resume.config.base_model
    if was and was != base_model:
        raise TLoraError(f"cannot resume a T-LoRA trained on {was} with a {base_model} model; load the {was} "
                         f"checkpoint it was trained on, or train a new T-LoRA (no resume).")
    had = resume.config.training.get("images")
    if had and had != image_id:
        raise TLoraError(f"cannot resume: the T-LoRA was trained on images {had}, this run has {image_id}; connect "
                         f"the same IMAGE (and MASK), or train a new T-LoRA (no resume).")


def images_id(image: torch.Tensor, mask: Optional[torch.Tensor]) -> str:
    """A short name of the training images: count, size and a hash of pixels and mask."""
    digest = hashlib.sha256(image.detach().float().cpu().contiguous().numpy().tobytes())
    if mask is not None:
        digest.update(mask.detach().float().cpu().contiguous().numpy().tobytes())
    n, h, w = (image.shape[0], image.shape[-3], image.shape[-2]) if image.dim() == 4 else (1, *image.shape[:2])
    return f"{n}x {w}x{h} px{' + mask' if mask is not None else ''} #{digest.hexdigest()[:12]}"

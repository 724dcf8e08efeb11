"""Applies a T-LoRA to a ComfyUI ModelPatcher so that the rank mask follows every model call's sigma.

How it enters ComfyUI (each with its undo, under a key of its own so several T-LoRAs stack):
- an APPLY_MODEL wrapper reads the sigmas of the call, turns them into t and r(t) (Sec. 3.2) and keeps
  the masks for the duration of that call;
- a PatcherInjection adds, on inject, two hooks to every adapted Linear and removes them on eject:
  * a `weight_function` (ComfyUI's per-forward weight hook, also used by its low-VRAM patches) that
    returns W + strength * dW(t) in one addmm when every row of the batch shares one t (CFG halves
    share their sigma): out*in*k extra work, independent of the number of tokens; one per Linear,
    whatever the number of fused slices adapted on it; while sampling it adds into the copy ComfyUI
    makes of the weight for the call, so the weight is copied once per call, by ComfyUI;
  * a forward hook that adds strength * dW(t_i) x_i to the output instead, per sample when rows carry
    different t, and for layers whose input has so few rows that this is cheaper (cross-attention
    keys/values, the deepest blocks);
  * in training, for layers with many rows, the two share the work: the weight function subtracts the
    frozen product of Eq. 6 (no gradient) from the weight copy ComfyUI makes anyway, and the forward
    hook adds only the trained product, so a T-LoRA step costs what a plain LoRA step costs plus one
    k x in x out product per layer.
  * a pre-hook / forward hook pair per Linear (WeightFunctionGate) that takes this runtime's weight
    functions off the Linear for a call in which none of its adapters adds anything on the weight:
    ComfyUI's ops copy the whole weight whenever a weight function is registered, so without the gate
    an activations-path call would pay a weight copy for nothing (1.1-1.2x the bare model on a DiT).
The base weights are never modified and nothing is merged, so unpatching gives the original model.
"""
from __future__ import annotations

import contextlib
import logging
import math
import uuid
from dataclasses import dataclass
from typing import Optional

import torch

import comfy.lora
import comfy.patcher_extension as pe

from ..tlora_core.adapter import (LayerFactors, activations_cheaper, delta_weight, frozen_product, masked_delta,
                                  stack_width, stacked_delta, stacked_factors, trained_delta, training_path)
from ..tlora_core.errors import TLoraError
from ..tlora_core.families import family_for
from ..tlora_core.format import TLora
from ..tlora_core.hooks import CallMasks, add_delta
from .timesteps import timesteps_from_sigmas

KEY_PREFIX = "comfyui-tlora"


@dataclass
class Target:
    """Where one T-LoRA layer lands: a Linear module and, for fused weights, a slice of its outputs."""

    layer_key: str
    module_path: str  # path below the BaseModel, e.g. "diffusion_model.input_blocks.1.1....to_q"
    rows: Optional[tuple[int, int]] = None  # (offset, size) along the output dimension


@dataclass
class Schedule:
    """The schedule settings in force for one application (file values unless overridden)."""

    rank: int
    min_rank: int
    exponent: float
    max_timestep: int


def resolve_targets(model, layer_keys, key_map: Optional[dict] = None,
                    fused: Optional[dict] = None) -> tuple[dict[str, Target], list[str]]:
    """Map T-LoRA layer keys to modules; returns (found, missing).

    Keys on a slice of a fused weight find their rows in the file's own record (TLoraConfig.fused),
    checked against the model's weight; every other key goes through ComfyUI's own LoRA key map
    (which also knows other trainers' names, and the fused slices of some families).
    """
    key_map = comfy.lora.model_lora_keys_unet(model, {}) if key_map is None else key_map
    fused = fused or {}
    found, missing = {}, []
    for key in layer_keys:
        if key in fused:
            module_path, offset, size, total = fused[key]
            weight = getattr(_submodule(model, module_path), "weight", None)
            if weight is None or weight.dim() != 2 or weight.shape[0] != total:
                missing.append(key)
                continue
            found[key] = Target(key, module_path, (offset, size))
            continue
        target = key_map.get(key) or key_map.get(f"diffusion_model.{key}")
        if target is None:
            missing.append(key)
            continue
        rows = None
        if isinstance(target, tuple):  # fused weight (e.g. Flux qkv): (weight key, (dim, offset, size))
            target, (dim, offset, size) = target[0], target[1][:3]
            if dim != 0:
                missing.append(key)
                continue
            rows = (offset, size)
        if not target.endswith(".weight"):
            missing.append(key)
            continue
        found[key] = Target(key, target[: -len(".weight")], rows)
    return found, missing


def _submodule(model, path: str):
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


FP8_DTYPES = tuple(getattr(torch, name) for name in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
                   if hasattr(torch, name))


def weight_path_exact(module, weight: torch.Tensor) -> bool:
    """Whether W + dW handed back by a weight function is what the layer multiplies by.

    Not for fp8 bases: ComfyUI's fp8 matmul path hands weight functions the fp8 weight itself (the sum
    would be rounded to fp8), and its legacy scaled-fp8 layers multiply the result by their
    `scale_weight` afterwards. Those layers add dW on activations instead (the forward hook), which is
    exact whatever the base's storage, and the base stays fp8.
    """
    return weight.dtype not in FP8_DTYPES and not torch.is_tensor(getattr(module, "scale_weight", None))


def this_calls_copy(module, weight: torch.Tensor) -> bool:
    """Whether the weight handed to a weight function is a copy made for this call alone, so that sampling
    may add dW to its rows in place instead of building a second whole-weight copy (Flux's linear1 is
    264 MiB in fp32: on a CPU the second copy cost more than the addmm itself).

    ComfyUI's cast path copies the weight whenever a Linear has weight functions (`cast_to(copy=True)`,
    into a per-call cast buffer on 0.33) and hands the copy, or what earlier functions made of it, down the
    list. Not so on 0.33's dynamic-VRAM path (a module with `_v`), which may hand a resident, cached weight
    as it is; and never the layer's parameter itself, whoever calls. A tensor that needs gradients is not
    written either."""
    if module is None or hasattr(module, "_v") or weight.requires_grad:
        return False
    param = getattr(module, "weight", None)
    try:
        return not torch.is_tensor(param) or not shares_storage(weight, param)
    except (RuntimeError, NotImplementedError):  # a quantized parameter without plain storage: do not guess
        return False


def shares_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype to add dW in: the tensor's own on an accelerator (fp16/bf16 GEMMs accumulate in fp32
    and round once) and for fp32; float32 for anything else (CPU half types, fp8 storage)."""
    if t.dtype == torch.float32 or (t.device.type != "cpu" and t.dtype in (torch.float16, torch.bfloat16)):
        return t.dtype
    return torch.float32


class AdaptedLayer:
    """The two hooks of one Linear; they read the masks of the current call from the runtime.

    A call whose rows share one t adds strength * dW(t) by the cheaper of two paths for the rows of
    the input (activations_cheaper; the Linear's WeightFunctionGate reads them, so a gradient-checkpoint
    replay takes the same path): on the weight (weight_function) or on the output (forward hook). A call whose rows
    carry different t always goes through the forward hook, with one mask per sample. Sampling uses
    the stacked form (W + s * left @ right is one addmm); training the two-pass form, whose frozen
    pass needs no gradients.
    """

    def __init__(self, runtime: "TLoraRuntime", target: Target, factors: LayerFactors):
        self.runtime, self.target, self.factors = runtime, target, factors
        self.width = stack_width(factors)
        self.handles: list = []
        self.trained = False  # factors that require grad: two-pass forms, nothing cached
        self.rows: Optional[int] = None  # rows of the input in progress, to pick the cheaper path
        self.on_weight = False  # weight_function added dW for the forward pass in progress
        self.frozen_on_weight = False  # ... or only the frozen product (training): the hook adds the trained one
        self.cache: dict = {}  # (device, dtype) -> stacked factors at full rank
        self.module: Optional[torch.nn.Module] = None  # the Linear, while injected

    def stacked(self, device, dtype, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """stacked_factors of the first k components on `device` in `dtype` (sampling only).

        Factors already there are stacked per call (O(k * (in + out)), no second copy of the adapter in
        memory); otherwise the full stack is kept per device and dtype in place of a moved copy, until
        the model is unloaded.
        """
        f = self.factors
        if f.down.device == device and f.down.dtype == dtype:
            return stacked_factors(f, k, dtype)
        if (device, dtype) not in self.cache:
            self.cache[(device, dtype)] = stacked_factors(f.to(device=device), None, dtype)
        left, right = self.cache[(device, dtype)]
        return left[:, :self.width * k], right[:self.width * k]

    def path(self, call: "CallMasks") -> str:
        """Where this call's dW goes (the rows share one t): 'weight', 'activations', or in training with
        frozen factors 'split' (tlora_core.adapter.training_path)."""
        f = self.factors
        if self.rows is None:
            return "weight"
        if self.trained:
            return training_path(self.rows, f.in_features, f.out_features, call.active, f.has_base)
        cheaper = activations_cheaper(self.rows, f.in_features, f.out_features, call.active, f.has_base, False)
        return "activations" if cheaper else "weight"

    def takes_weight(self, call: Optional["CallMasks"]) -> bool:
        """Whether this call may add something on the weight (new_rows may return rows): False means the
        forward hook adds all of dW on the activations and the weight function would hand W back."""
        return (call is not None and call.uniform and self.runtime.strength != 0
                and self.path(call) != "activations")

    def new_rows(self, weight: torch.Tensor, in_place: bool = False) -> Optional[torch.Tensor]:
        """This layer's rows of W + strength * dW(t), in the weight's dtype, when this call adds dW on the
        weight; None when the forward hook adds it on the activations instead. With `in_place` (the weight
        is this call's own copy: this_calls_copy) sampling adds dW into the weight's rows and returns that
        view, where it computes in the weight's dtype."""
        self.on_weight = self.frozen_on_weight = False
        call = self.runtime.current
        if not self.takes_weight(call) or not weight_path_exact(self.module, weight):
            return None
        path = self.path(call)
        # Training builds dW in float32 (a difference of two close products; autocast may still lower it).
        dtype, strength = torch.float32 if self.trained else compute_dtype(weight), self.runtime.strength
        offset, size = self.target.rows or (0, weight.shape[0])
        rows = weight[offset:offset + size].to(dtype)
        if path == "split":  # W - strength * B0 S0 M A0: frozen factors, so no graph; forward_hook adds the rest
            self.frozen_on_weight = True
            with torch.no_grad():
                frozen = frozen_product(self.factors.to(device=weight.device), call.masks[0], call.active, dtype)
                return torch.add(rows, frozen, alpha=-strength).to(weight.dtype)
        self.on_weight = True
        if self.trained:  # two passes: the frozen product needs no gradient
            dw = delta_weight(self.factors.to(device=weight.device), call.masks[0], call.active, dtype)
            new = torch.add(rows, dw, alpha=strength)
        else:
            left, right = self.stacked(weight.device, dtype, call.active)
            if in_place and dtype == weight.dtype:  # rows is then a view of the weight
                return rows.addmm_(left, right, alpha=strength)
            new = torch.addmm(rows, left, right, alpha=strength)
        return new.to(weight.dtype)

    def delta(self, x: torch.Tensor, masks: Optional[torch.Tensor], k: int) -> torch.Tensor:
        """dW(t) x of the first k components (masks: per row, or None when all rows keep them)."""
        dtype = compute_dtype(x)
        if self.frozen_on_weight:
            return trained_delta(x.to(dtype), self.factors.to(device=x.device), masks, active=k)
        if self.trained:
            return masked_delta(x.to(dtype), self.factors.to(device=x.device), masks, active=k)
        left, right = self.stacked(x.device, dtype, k)
        return stacked_delta(x.to(dtype), left, right, self.width, masks)

    def forward_hook(self, module, args, output):
        on_weight, self.on_weight = self.on_weight, False
        call = self.runtime.current
        try:
            if call is None or on_weight or self.runtime.strength == 0:
                return None
            return add_delta(output, args[0], call, self.runtime.strength, self.delta, self.target.layer_key,
                             self.target.rows)
        finally:
            self.frozen_on_weight = False


class SharedWeightFunction:
    """The one `weight_function` of a Linear for this runtime's adapters on it: a whole Linear's, or the
    slices of a fused weight (Flux's q, k, v of one qkv). Sampling adds each slice's dW into the copy
    ComfyUI made for the call (this_calls_copy); otherwise the patched weight is built in ONE new copy, the
    untouched rows and each slice's W + dW side by side, never one whole-weight copy per slice."""

    def __init__(self, layers: list):
        self.layers = layers  # ordered by row offset, rows not overlapping

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        in_place = this_calls_copy(self.layers[0].module, weight)
        pieces, cursor = [], 0
        for layer in self.layers:
            new = layer.new_rows(weight, in_place)
            if new is None or shares_storage(new, weight):  # nothing on the weight, or added in place
                continue
            offset, size = layer.target.rows or (0, weight.shape[0])
            pieces += [weight[cursor:offset], new]
            cursor = offset + size
        if not pieces:
            return weight
        pieces = [p for p in pieces + [weight[cursor:]] if p.shape[0]]
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


def shared_weight_functions(layers: list) -> dict[str, list[SharedWeightFunction]]:
    """module path -> the SharedWeightFunctions of its adapters: slices sorted by row, a new function
    only where rows would overlap (two keys of one file on the same rows: each adds its own dW)."""
    by_module: dict[str, list[list]] = {}
    for layer in sorted(layers, key=lambda a: (a.target.module_path, (a.target.rows or (0, 0))[0])):
        offset, size = layer.target.rows or (0, 1 << 62)  # a whole Linear covers every row
        groups = by_module.setdefault(layer.target.module_path, [])
        group = next((g for g in groups if g[-1][1] <= offset), None)
        if group is None:
            groups.append(group := [])
        group.append((layer, offset + size))
    return {path: [SharedWeightFunction([layer for layer, _ in g]) for g in groups]
            for path, groups in by_module.items()}


SUSPENDED = "_tlora_suspended_weight_functions"  # on a Linear while a call runs with functions taken off


def suspend_weight_functions(module, functions: list):
    """Take `functions` off the module's weight_function list for the call in progress; every other entry
    (ComfyUI's low-VRAM patches, another T-LoRA's functions) stays, in its order. The list in force before
    the first suspension is kept on the module, so that runtimes stacked on one Linear may resume in any
    order."""
    stash = module.__dict__.get(SUSPENDED)
    if stash is None:
        stash = (module.weight_function, [])  # (the full list, the functions taken off it)
        module.__dict__[SUSPENDED] = stash
    full, off = stash
    off.extend(functions)
    module.weight_function = [f for f in full if not any(f is g for g in off)]


def resume_weight_functions(module, functions: list):
    """Undo suspend_weight_functions for `functions`; once nothing is off, the original list object is back."""
    stash = module.__dict__.get(SUSPENDED)
    if stash is None:
        return
    full, off = stash
    off[:] = [g for g in off if not any(g is f for f in functions)]
    if off:
        module.weight_function = [f for f in full if not any(f is g for g in off)]
    else:
        module.weight_function = full
        del module.__dict__[SUSPENDED]


class WeightFunctionGate:
    """Registers this runtime's weight functions with a Linear only for the calls that need them.

    ComfyUI's ops run a Linear through their cast path, which copies the whole weight, whenever its
    weight_function list is not empty. For a call in which none of this runtime's adapters on the Linear
    adds anything on the weight (activations path by the rows of the input, rows with different t,
    strength 0), their functions would hand the weight back unchanged, so the pre-hook takes them off the
    list for that call and the forward hook (always called, also when the forward raises) puts them back:
    the op then runs exactly as it does without the T-LoRA, and the layers' forward hooks add dW x.
    The pre-hook also records the rows of the input for the layers' choice of path, so a gradient-
    checkpoint replay (same rows, same masks) makes the same choice.
    """

    def __init__(self, runtime: "TLoraRuntime", layers: list, functions: list):
        self.runtime, self.layers, self.functions = runtime, layers, functions
        self.suspended = False

    def pre_hook(self, module, args):
        rows = args[0].numel() // args[0].shape[-1]
        for layer in self.layers:
            layer.rows = rows
        call = self.runtime.current
        if not any(layer.takes_weight(call) for layer in self.layers):
            suspend_weight_functions(module, self.functions)
            self.suspended = True

    def forward_hook(self, module, args, output):
        if self.suspended:
            self.suspended = False
            resume_weight_functions(module, self.functions)

    def register(self, module) -> list:
        return [module.register_forward_pre_hook(self.pre_hook),
                module.register_forward_hook(self.forward_hook, always_call=True)]


class TLoraRuntime:
    """One application of a T-LoRA on one ModelPatcher (create it through `apply_tlora`)."""

    def __init__(self, tlora: TLora, targets: dict[str, Target], strength: float, schedule: Schedule):
        self.key = f"{KEY_PREFIX}-{uuid.uuid4().hex[:12]}"
        self.tlora, self.strength, self.schedule = tlora, float(strength), schedule
        self.layers = [AdaptedLayer(self, t, tlora.layers[k]) for k, t in targets.items()]
        self.current: Optional[CallMasks] = None
        self.last: Optional[CallMasks] = None  # masks of the latest call, for gradient-checkpoint replays
        self.weight_functions = shared_weight_functions(self.layers)
        self.gate_handles: list = []

    def masks_for(self, t: torch.Tensor, device) -> CallMasks:
        s = self.schedule
        return CallMasks.for_timesteps(t, s.rank, s.min_rank, s.exponent, s.max_timestep, device)

    def apply_model_wrapper(self, executor, x, t, *args, **kwargs):
        """APPLY_MODEL wrapper: t here is the sigma batch of this call."""
        model_sampling = executor.class_obj.model_sampling
        timesteps = timesteps_from_sigmas(model_sampling, t, self.schedule.max_timestep)
        previous, self.current = self.current, self.masks_for(timesteps, x.device)
        self.last = self.current
        try:
            return executor(x, t, *args, **kwargs)
        finally:
            self.current = previous

    @contextlib.contextmanager
    def replaying_last_call(self):
        """Masks of the latest call in force again: gradient checkpointing re-runs the forward pass
        inside backward(), after the model call (and its wrapper) has returned."""
        previous, self.current = self.current, self.last
        try:
            yield
        finally:
            self.current = previous

    def inject(self, patcher):
        model = patcher.model
        for layer in self.layers:
            module = model.get_submodule(layer.target.module_path)
            layer.module = module
            layer.trained = any(t.requires_grad for t in layer.factors.tensors().values())
            layer.handles = [module.register_forward_hook(layer.forward_hook)]
        self.gate_handles = []
        for path, functions in self.weight_functions.items():
            module = model.get_submodule(path)
            # Instance list, never the class attribute shared by every Linear. A plain torch Linear
            # ignores weight_function: on_weight then stays False and the forward hook adds dW.
            module.weight_function = list(getattr(module, "weight_function", [])) + functions
            gate = WeightFunctionGate(self, [layer for f in functions for layer in f.layers], functions)
            self.gate_handles += gate.register(module)

    def eject(self, patcher):
        model = patcher.model
        for path, functions in self.weight_functions.items():
            module = model.get_submodule(path)
            module.weight_function = [f for f in getattr(module, "weight_function", [])
                                      if not any(f is mine for mine in functions)]
        for handle in self.gate_handles:
            handle.remove()
        self.gate_handles = []
        for layer in self.layers:
            for handle in layer.handles:
                handle.remove()
            layer.handles = []
            layer.module = None
            layer.cache.clear()  # the device copies go with the model


def family_of(name: str) -> Optional[str]:
    """The family (tlora_core.families) of a config class name, None if unknown."""
    family = family_for(name)
    return None if family is None else family.name


def check_family(model, tlora: TLora):
    """Refuse a T-LoRA whose metadata names another model family than the model it is applied to."""
    names = [cls.__name__ for cls in type(model.model_config).__mro__]
    have = family_for(names)
    wanted = tlora.config.family or family_of(tlora.config.base_model)
    if wanted and have and wanted != have.name:
        raise TLoraError(f"this T-LoRA was made for {wanted} ({tlora.config.base_model}) but the model is "
                         f"{have.name} ({names[0]}). Load a {wanted} checkpoint, or a T-LoRA trained on this one.")


def base_weight_lookup(model):
    """layer key -> the model's weight (float32, CPU) for readers that rebuild frozen factors from W."""
    key_map = comfy.lora.model_lora_keys_unet(model, {})

    def lookup(layer_key: str) -> Optional[torch.Tensor]:
        targets, _ = resolve_targets(model, [layer_key], key_map)
        if layer_key not in targets:
            return None
        target = targets[layer_key]
        weight = model.get_submodule(target.module_path).weight.detach().float().cpu()
        return weight if target.rows is None else weight[target.rows[0]:target.rows[0] + target.rows[1]]
    return lookup


def check_shapes(model, tlora: TLora, targets: dict[str, Target]):
    """Refuse layers whose factor shapes do not fit the module they resolve to."""
    for key, target in targets.items():
        weight = model.get_submodule(target.module_path).weight
        out_f = target.rows[1] if target.rows else weight.shape[0]
        f = tlora.layers[key]
        if weight.dim() != 2 or (out_f, weight.shape[1]) != (f.out_features, f.in_features):
            raise TLoraError(
                f"T-LoRA layer {key} has shape [{f.out_features}, {f.in_features}] but the model's "
                f"{target.module_path} is {list(weight.shape)}: the T-LoRA was made for another model "
                f"(its base model: {tlora.config.base_model or 'unknown'}).")


def check_overrides(strength: float, min_rank: Optional[int] = None, exponent: Optional[float] = None):
    """Refuse a strength or schedule override that is not a finite number (NaN would turn every image black)."""
    def number(value) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

    if not number(strength):
        raise TLoraError(f"strength must be a finite number, got {strength!r}; use 1 for the T-LoRA as trained "
                         f"(0 gives the model unchanged).")
    if min_rank is not None and not (number(min_rank) and float(min_rank).is_integer()):
        raise TLoraError(f"r_min must be a whole number, got {min_rank!r}; use 0 in the node to keep the T-LoRA's "
                         f"own r_min.")
    if exponent is not None and not (number(exponent) and exponent > 0):
        raise TLoraError(f"schedule exponent must be a finite number > 0, got {exponent!r}; use 0 in the node to "
                         f"keep the T-LoRA's own exponent (1 is the paper's straight line).")


def apply_tlora(model_patcher, tlora: TLora, strength: float = 1.0, min_rank: Optional[int] = None,
                exponent: Optional[float] = None):
    """A clone of `model_patcher` with the T-LoRA attached; the input patcher is not changed.

    min_rank / exponent override the file's schedule (None keeps it). Returns (patcher, runtime).
    """
    check_overrides(strength, min_rank, exponent)
    cfg = tlora.config
    schedule = Schedule(cfg.rank, cfg.schedule_min_rank if min_rank is None else int(min_rank),
                        cfg.exponent if exponent is None else float(exponent), cfg.max_timestep)
    if not 1 <= schedule.min_rank <= schedule.rank:
        raise TLoraError(f"r_min must be between 1 and the T-LoRA's rank {schedule.rank}, got {schedule.min_rank}.")
    if not schedule.exponent > 0:
        raise TLoraError(f"schedule exponent must be > 0, got {schedule.exponent}.")
    check_family(model_patcher.model, tlora)
    targets, missing = resolve_targets(model_patcher.model, tlora.layers.keys(), fused=cfg.fused)
    if not targets:
        raise TLoraError(
            f"none of the T-LoRA's {len(tlora.layers)} layers (e.g. {next(iter(tlora.layers), '?')}) match "
            f"this model ({type(model_patcher.model).__name__}); it was made for "
            f"{cfg.base_model or 'another model'}. Load the checkpoint it was trained on.")
    if missing:
        logging.warning("T-LoRA: %d of %d layers match nothing in the model and are skipped (e.g. %s).",
                        len(missing), len(tlora.layers), missing[0])
    check_shapes(model_patcher.model, tlora, targets)
    runtime = TLoraRuntime(tlora, targets, strength, schedule)
    patched = model_patcher.clone()
    patched.set_injections(runtime.key, [pe.PatcherInjection(inject=runtime.inject, eject=runtime.eject)])
    patched.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL, runtime.key, runtime.apply_model_wrapper)
    logging.info("T-LoRA: applied %d layers (%s, rank %d, r_min %d, strength %g).", len(targets),
                 cfg.variant, schedule.rank, schedule.min_rank, strength)
    return patched, runtime

"""One training run of "Train T-LoRA from image": data, factors, optimiser, saving, progress, cancel."""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

import comfy.lora
import comfy.model_management as mm
import comfy.model_sampling
import comfy.patcher_extension as pe

from ..tlora_core.adapter import TRAINABLE_FIELDS, LayerFactors
from ..tlora_core.config import TLoraConfig
from ..tlora_core.errors import TLoraError
from ..tlora_core.families import FAMILIES, Family, Recipe, Site, family_for, generic_family
from ..tlora_core.format import TLora, load_tlora
from ..tlora_core.init import init_factors
from .data import prepare_images, source_side
from .files import next_free_path
from .loop import LoopHooks, PositiveOnlyGuider, StepRecipe, TrainSampler, saved_copies
from .optim import build_optimizer, capture_optimizer, grad_scaler, restore_optimizer_state
from .preview import PreviewSettings, preview_conditions
from .resume import (capture, check_family_and_image, images_id, save_with_state, state_for, trainable_tensors,
                     usable_optimizer_state)
from .runtime import apply_tlora
from .settings import TrainSettings

AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class TrainResult:
    tlora: TLora            # the trained T-LoRA as read back from its final file
    saved: list[Path]       # every file written, oldest first
    losses: list[float]
    previews: Optional[torch.Tensor] = None  # IMAGE batch [n, H, W, 3] of this run's previews, oldest first
    timesteps: list[float] = field(default_factory=list)  # each step's mean t (0..T), as `losses`
    first_step: int = 1  # the step number of losses[0] (above 1 when the run resumed another)


def config_class_names(base_model) -> tuple[str, ...]:
    """The names of a ComfyUI BaseModel's config class and its bases, most specific first."""
    return tuple(cls.__name__ for cls in type(base_model.model_config).__mro__)


def model_family(base_model) -> Family:
    """The family table entry of a ComfyUI BaseModel, from its config class and that class's bases; a class
    the table does not list gets the generic rule (tlora_core.families.generic_family)."""
    names = config_class_names(base_model)
    family = family_for(names)
    if family is None:
        flow = isinstance(base_model.model_sampling, comfy.model_sampling.CONST)
        family = generic_family(names[0], flow)
    return family


def find_target_layers(base_model, targets: str) -> dict[str, Site]:
    """The adapter sites of a target set in a ComfyUI BaseModel (one per projection of fused weights),
    checked against ComfyUI's LoRA key map. A model the table does not list logs every adapted layer."""
    family = model_family(base_model)
    sites = family.sites(base_model.diffusion_model, targets)
    name = type(base_model.model_config).__name__
    if not sites:
        raise TLoraError(f"T-LoRA found no attention projections to adapt in this {name} model "
                         f"({type(base_model.diffusion_model).__name__}, {targets!r} targets): it cannot train it. "
                         f"Supported families: {', '.join(f.name for f in FAMILIES)}.")
    check_against_key_map(base_model, sites)
    if family_for([cls.__name__ for cls in type(base_model.model_config).__mro__]) is None:
        logging.warning("T-LoRA: %s is not in the family table; the generic rule adapts %d layers: %s", name,
                        len(sites), ", ".join(sites))
    return sites


def check_against_key_map(base_model, sites: dict[str, Site]):
    """Every site's weight is one ComfyUI's LoRA key map resolves (so an exported LoRA loads in its stock
    loader), and a slice of a fused weight never cuts across a projection that key map knows (its
    diffusers-style entries name q, k, v rows of Flux, SD3, PixArt, HunyuanVideo, ... weights)."""
    weights, slices = set(), {}
    for target in comfy.lora.model_lora_keys_unet(base_model, {}).values():
        if isinstance(target, str) or target[1] is None:  # a whole weight, or (weight, no slice)
            weights.add(target if isinstance(target, str) else target[0])
        elif len(target[1]) >= 3 and target[1][0] == 0:
            slices.setdefault(target[0], set()).add((target[1][1], target[1][2]))
    for key, site in sites.items():
        weight = f"{site.module_path}.weight"
        if weight not in weights and weight not in slices:
            raise TLoraError(f"{weight} is not in ComfyUI's LoRA key map for this model: a T-LoRA on {key} could "
                             f"not be exported to a LoRA its loader reads.")
        if site.rows is None:
            continue
        start, end = site.rows[0], site.rows[0] + site.rows[1]
        for offset, size in slices.get(weight, ()):
            inside = offset <= start and end <= offset + size or start <= offset and offset + size <= end
            if not inside and start < offset + size and offset < end:
                raise TLoraError(f"{key}: rows {start}..{end} of {weight} cut across ComfyUI's projection at rows "
                                 f"{offset}..{offset + size}; this model's fused layout was not inferred right.")


def fused_record(base_model, sites: dict[str, Site]) -> dict[str, list]:
    """TLoraConfig.fused for the sites on slices of fused weights: the file names its own rows."""
    return {key: [site.module_path, site.rows[0], site.rows[1],
                  base_model.get_submodule(site.module_path).weight.shape[0]]
            for key, site in sites.items() if site.rows is not None}


def new_factors(sites: dict[str, Site], s: TrainSettings, ortho: bool, device) -> dict[str, LayerFactors]:
    """Seeded initial factors per adapter site, on the training device, float32."""
    return {key: init_factors(ortho, site.in_features, site.out_features, s.rank, s.init, s.seed, key,
                              device=device) for key, site in sites.items()}


def make_trainable(tlora: TLora, device) -> list[torch.Tensor]:
    """Fresh copies of the factors on the device; trainable ones become leaf tensors with grad.

    Every factor is copied, the frozen ones too: factors read by a node (Load T-LoRA, a previous Train)
    were made under ComfyUI's inference mode, and autograd may not save such tensors for backward.
    The copies are contiguous whatever the source (fresh init slices SVD factors, a file's are dense):
    matmul kernels depend on the layout, and a resumed run must compute exactly like the first one.
    """
    params = []
    for key, f in tlora.layers.items():
        f = LayerFactors(**{n: t.detach().to(device=device, dtype=torch.float32).clone(
            memory_format=torch.contiguous_format) for n, t in f.tensors().items()})
        for name in TRAINABLE_FIELDS:
            t = getattr(f, name)
            if t is not None:
                params.append(t.requires_grad_(True))
        tlora.layers[key] = f
    return params


def detached_copy(tlora: TLora, steps_done: int, settings: TrainSettings) -> TLora:
    """A CPU snapshot of the factors with the training record updated."""
    layers = {k: LayerFactors(**{n: t.detach().to("cpu", copy=True) for n, t in f.tensors().items()})
              for k, f in tlora.layers.items()}
    config = tlora.config.replace(training={**tlora.config.training, **settings.record(), "steps_done": steps_done})
    return TLora(config=config, layers=layers)


_CONTAINERS = (torch.nn.ModuleList, torch.nn.ModuleDict)


def _members(container) -> list[torch.nn.Module]:
    """The modules a ModuleList / ModuleDict holds, nested containers opened (a container is never called
    itself, its members are: Stable Cascade keeps one list of blocks per level, Cosmos 1 a dict of blocks)."""
    items = container.values() if isinstance(container, torch.nn.ModuleDict) else container
    return [unit for m in items for unit in (_members(m) if isinstance(m, _CONTAINERS) else [m])]


def checkpoint_units(diffusion_model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules whose forward gets checkpointed: each block of the model's ModuleLists and ModuleDicts
    (and its middle block); for Sequential blocks their layers, because ComfyUI's UNet calls those one by one."""
    blocks = [b for child in diffusion_model.children() if isinstance(child, _CONTAINERS) for b in _members(child)]
    middle = getattr(diffusion_model, "middle_block", None)
    blocks += [middle] if isinstance(middle, torch.nn.Module) else []
    return [unit for b in blocks for unit in (list(b.children()) if isinstance(b, torch.nn.Sequential) else [b])]


class _Recompute(torch.autograd.Function):
    """Activation checkpointing of one block: forward without keeping activations, the block run again
    inside backward. Written out rather than torch.utils.checkpoint because blocks may add to tensors in
    place after saving them (Flux's `x += ...`): torch's recomputation keeps saved tensors by reference
    with no version check, so the gradients would come out wrong without an error. Here the block runs
    on copies of its inputs, and its recomputation keeps copies of what it saves (`copy_saved`; not of the
    block's own weights, `unit`'s parameters).
    `anchor` requires grad so that backward runs even when no input does (the first block's)."""

    @staticmethod
    def forward(ctx, call, unit, copy_saved, anchor, *tensors):
        ctx.call, ctx.unit, ctx.copy_saved = call, unit, copy_saved
        ctx.autocast = [(device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
                        for device in {t.device.type for t in tensors} if torch.amp.is_autocast_available(device)]
        ctx.save_for_backward(*tensors)
        with torch.no_grad():
            return call([t.clone() for t in tensors])

    @staticmethod
    def backward(ctx, *grads):
        inputs = [t.detach().requires_grad_(needs) for t, needs in zip(ctx.saved_tensors, ctx.needs_input_grad[4:])]
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.enable_grad())
            for device, enabled, dtype in ctx.autocast:
                stack.enter_context(torch.autocast(device, dtype=dtype, enabled=enabled))
            stack.enter_context(saved_copies(ctx.copy_saved, ctx.unit))
            outputs = ctx.call([t.clone() for t in inputs])
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        pairs = [(o, g) for o, g in zip(outputs, grads) if g is not None and o.requires_grad]
        torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        return (None, None, None, None,
                *[t.grad if needs else None for t, needs in zip(inputs, ctx.needs_input_grad[4:])])


def _checkpointed(unit: torch.nn.Module, copy_saved: bool, anchor: torch.Tensor):
    """`unit`'s forward under _Recompute; its floating-point tensor arguments go through
    autograd, everything else (options, masks of ints, None) is passed as it is."""
    inner = unit.forward

    def forward(*args, **kwargs):
        names = list(kwargs)
        values = list(args) + [kwargs[n] for n in names]
        slots = [i for i, v in enumerate(values) if torch.is_tensor(v) and v.is_floating_point()]

        def call(tensors):
            filled = list(values)
            for i, t in zip(slots, tensors):
                filled[i] = t
            return inner(*filled[:len(args)], **dict(zip(names, filled[len(args):])))
        return _Recompute.apply(call, unit, copy_saved, anchor, *[values[i] for i in slots])
    return forward


@contextlib.contextmanager
def checkpointed_blocks(diffusion_model: torch.nn.Module, enabled: bool, copy_saved: bool = False):
    """Gradient checkpointing: activations inside each unit are recomputed in backward, not kept.

    Sets an instance `forward` on each unit and removes it on exit. copy_saved: the model changes saved
    tensors in place (Family.inplace_residuals).
    """
    units = checkpoint_units(diffusion_model) if enabled else []
    anchor = torch.zeros((), requires_grad=True)
    for unit in units:
        unit.forward = _checkpointed(unit, copy_saved, anchor)
    try:
        yield
    finally:
        for unit in units:
            del unit.forward


def recipe_extras(recipe: Recipe, image: torch.Tensor, pixels: torch.Tensor) -> dict:
    """Conditioning values the family's reference recipe trains with: the training guidance of
    guidance-distilled models (the reference FLUX code trains at 1; ComfyUI's default would be 3.5) and
    SD-XL's size embedding as the reference passes it (original size = the source's centred square side,
    crop corner 0, target = the training size)."""
    extras = {} if recipe.guidance is None else {"guidance": recipe.guidance}
    if recipe.size_conditioning:
        side, size = source_side(image), min(pixels.shape[1:3])
        extras.update(width=side, height=side, crop_w=0, crop_h=0, target_width=size, target_height=size)
    return extras


def training_conditioning(clip, conditioning, prompt: str, extras: dict):
    """The CONDITIONING to train with: the one given (any encoder node's output, e.g. CLIPTextEncode +
    FluxGuidance), else the prompt encoded with `clip`; each of the recipe's `extras` it lacks is filled in
    (a value the conditioning carries, such as a connected FluxGuidance, is kept)."""
    if conditioning is None:
        if clip is None:
            raise TLoraError("the Train node needs a text conditioning: connect a CLIP (the prompt is encoded with "
                             "it) or a CONDITIONING from your model's own text-encoder nodes.")
        conditioning = clip.encode_from_tokens_scheduled(clip.tokenize(prompt))
    filled = sorted({k for _, extra in conditioning for k in extras if k not in extra})
    if filled:
        logging.info("T-LoRA: training conditioning without %s: using the recipe's %s.", ", ".join(filled),
                     ", ".join(f"{k} {extras[k]}" for k in filled))
    return [[c, {**extras, **extra}] for c, extra in conditioning]


def encode(vae, positive, pixels: torch.Tensor, weights: Optional[torch.Tensor]):
    """Latents, latent-size loss weights and the conditioning, computed once, without gradients.

    Cloned so that they are ordinary tensors even when ComfyUI runs the node in inference mode.
    """
    with torch.no_grad():
        latents = vae.encode(pixels).float().clone()
        lw = None
        if weights is not None:
            lw = F.interpolate(weights.unsqueeze(1).float(), size=latents.shape[-2:], mode="area").clone()
    return latents, lw, plain_conditioning(positive)


def plain_conditioning(conditioning):
    """A copy of a CONDITIONING made of ordinary tensors (not inference tensors, no autograd history)."""
    with torch.no_grad():
        return [[c.clone(), {k: (v.clone() if torch.is_tensor(v) else v) for k, v in extra.items()}]
                for c, extra in conditioning]


@contextlib.contextmanager
def frozen_base(model: torch.nn.Module):
    """No gradients for the base model's own weights during training; flags put back afterwards.

    Also raises ComfyUI's `in_training` flag (newer ComfyUI turns off kernels without autograd support
    when it is set; older versions ignore it).
    """
    flags = [p for p in model.parameters() if not p.is_inference() and p.requires_grad]
    for p in flags:
        p.requires_grad_(False)
    was_training = getattr(mm, "in_training", False)
    mm.in_training = True
    try:
        yield
    finally:
        mm.in_training = was_training
        for p in flags:
            p.requires_grad_(True)


def _fresh_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A weight function that changes nothing: its presence makes ComfyUI's ops copy the weight."""
    return tensor


def inference_weight_copies() -> pe.PatcherInjection:
    """An injection that lets autograd run through a model loaded in inference mode.

    ComfyUI runs nodes in inference mode, so a model loaded there holds inference tensors, which
    autograd may not save for backward. For every ComfyUI op whose weight or bias is one, a no-op
    weight/bias function is added: the op then hands forward a fresh (ordinary) copy. Parameters of
    modules that are not ComfyUI ops (the RMSNorm scales of SD3's and Flux's q/k norms on some hosts)
    are swapped for ordinary copies while the model is loaded, and put back on eject. An injection,
    because ModelPatcher.load resets these lists and re-applies injections afterwards.
    """
    added, swapped = [], []

    def inject(patcher):
        for m in patcher.model.modules():
            if not hasattr(m, "comfy_cast_weights"):
                for name, p in list(m.named_parameters(recurse=False)):
                    if p.is_inference():
                        setattr(m, name, torch.nn.Parameter(p.clone(), requires_grad=False))
                        swapped.append((m, name, p))
                continue
            for attr, fn_list in (("weight", "weight_function"), ("bias", "bias_function")):
                t = getattr(m, attr, None)
                if t is not None and t.is_inference():
                    setattr(m, fn_list, list(getattr(m, fn_list)) + [_fresh_copy])
                    added.append((m, fn_list))

    def eject(patcher):
        for m, fn_list in added:
            setattr(m, fn_list, [f for f in getattr(m, fn_list) if f is not _fresh_copy])
        for m, name, p in swapped:
            setattr(m, name, p)
        added.clear()
        swapped.clear()

    return pe.PatcherInjection(inject=inject, eject=eject)


def compute_in_fp32(patched):
    """Make the training clone compute in float32 (ComfyUI's compute-dtype setting: weights stored in 16 or
    8 bits are cast up per layer), as the reference trains SD-XL with mixed precision off."""
    base = patched.model
    current = base.manual_cast_dtype if base.manual_cast_dtype is not None else base.get_dtype()
    if current != torch.float32:
        patched.set_model_compute_dtype(torch.float32)


def resolve_dtype(name: str, device) -> Optional[torch.dtype]:
    """Autocast dtype: None means plain fp32. 'auto' is bf16 on GPUs that have it, else fp32."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" and mm.should_use_bf16(device) else None
    return AUTOCAST[name]


def train_tlora(model, clip, vae, image: torch.Tensor, mask: Optional[torch.Tensor], settings: TrainSettings,
                output_folder: str, prefix: str, resume: Optional[TLora] = None,
                progress: Optional[Callable[[int, int, float], None]] = None, conditioning=None,
                previews: Optional[PreviewSettings] = None,
                show_preview: Optional[Callable[[int, int, torch.Tensor], None]] = None) -> TrainResult:
    """Train a T-LoRA on `model` (never modified) and save it under output_folder/prefix_NNNNN.safetensors.

    The prompt is encoded with `clip` unless a ready `conditioning` is given. With `previews`, an image
    is sampled every `previews.every` steps; `show_preview(step, steps, latent)` gets each one at once
    (sampler latent space), and the result holds them all decoded with `vae`.
    """
    family = model_family(model.model)
    settings = settings.for_recipe(family.recipe)
    base_model = type(model.model.model_config).__name__
    pixels, weights = prepare_images(image, mask, settings.resolution, family.recipe.resolution, settings.crop)
    sites = find_target_layers(model.model, settings.targets) if resume is None else None
    config = settings.tlora_config(
        base_model=base_model, family=family.name, source="comfyui-tlora trainer",
        fused=fused_record(model.model, sites) if sites is not None else resume.config.fused)
    config = config.replace(training={**config.training, "images": images_id(image, mask)})
    start, state = 0, None
    if resume is not None:
        start = check_resume(resume, config, settings)
        check_family_and_image(resume, base_model, config.training["images"])
        state = state_for(resume, start)
    next_free_path(output_folder, prefix)  # refuse a bad file name before training, not after
    saved: list[Path] = []
    losses: list[float] = []
    timesteps: list[float] = []
    preview_latents: list[torch.Tensor] = []  # ready for the VAE (process_latent_out), on the CPU
    previews = previews if previews is not None and previews.every > 0 else None
    history = list(state.losses) if state is not None else []  # every step's loss, earlier runs included
    device = mm.get_torch_device()
    with torch.inference_mode(False), torch.enable_grad():
        positive = training_conditioning(clip, conditioning, settings.prompt,
                                         recipe_extras(family.recipe, image, pixels))
        latents, pixel_weights, positive = encode(vae, positive, pixels, weights)
        if resume is None:
            tlora = TLora(config, new_factors(sites, settings, config.ortho, device))
        else:  # the exact float32 factors of the state when there is one (the file may hold 16-bit values)
            tlora = TLora(config, dict(state.factors if state is not None else resume.layers))
        with torch.no_grad():
            extra_conds = {} if previews is None else {
                k: plain_conditioning(c) for k, c in preview_conditions(clip, positive, previews).items()}
        params = make_trainable(tlora, device)
        patched, runtime = apply_tlora(model, tlora, 1.0)
        patched.set_injections(f"{runtime.key}-training", [inference_weight_copies()])
        autocast_dtype = resolve_dtype(settings.training_dtype, device)
        if autocast_dtype is None:
            compute_in_fp32(patched)
        optimizer = build_optimizer(settings.optimizer, params, settings.learning_rate, settings.weight_decay)
        scaler = grad_scaler(device, autocast_dtype)
        named = trainable_tensors(tlora)
        saved_state = usable_optimizer_state(state, settings.optimizer) if state is not None else None
        if saved_state is not None:
            restore_optimizer_state(optimizer, named, saved_state, scaler)
        rng_after_step = {}  # the generator's state after the last finished step, for saving

        def save(step: int):
            path = next_free_path(output_folder, prefix, f"{step}steps" if step < settings.steps else "")
            snapshot = detached_copy(tlora, step, settings)
            run_state = capture(tlora, capture_optimizer(settings.optimizer, optimizer, named, scaler),
                                rng_after_step["rng"], history, step)
            saved.append(save_with_state(snapshot, run_state, path, settings.storage))
            logging.info("T-LoRA: saved %s", saved[-1])

        def on_step(step: int, loss: float):
            losses.append(loss)
            timesteps.append(sampler.last_t)
            history.append(loss)
            rng_after_step["rng"] = sampler.generator.get_state()
            if progress is not None:
                progress(step, settings.steps, loss)

        def on_preview(step: int, latent: torch.Tensor):
            preview_latents.append(model.model.process_latent_out(latent.float()).cpu())
            if show_preview is not None:
                show_preview(step, settings.steps, latent)

        hooks = LoopHooks(on_step=on_step, save=save, start_step=start, on_preview=on_preview,
                          should_save=lambda step: step < settings.steps and settings.save_every > 0
                          and step % settings.save_every == 0)
        step_recipe = StepRecipe(settings.batch_size, settings.sigma_draw, settings.crop == "random",
                                 settings.max_grad_norm, scaler)
        sampler = TrainSampler(pixel_weights, step_recipe, optimizer, settings.steps, settings.seed, autocast_dtype,
                               hooks, runtime, copy_saved=family.inplace_residuals, previews=previews)
        if state is not None:
            sampler.generator.set_state(state.rng)
        guider = PositiveOnlyGuider(patched)
        guider.set_conds(positive, **extra_conds)
        try:
            with frozen_base(model.model), checkpointed_blocks(model.model.diffusion_model,
                                                                settings.gradient_checkpointing,
                                                                family.inplace_residuals):
                guider.sample(torch.zeros_like(latents), latents, sampler, torch.tensor([1.0, 0.0]),
                              seed=settings.seed, disable_pbar=True)
            save(settings.steps)
        except mm.InterruptProcessingException:
            done = start + len(losses)
            if losses:  # keep what was learned: a cancelled run still leaves a file
                save(done)
            logging.warning("T-LoRA: cancelled at step %d of %d; %s", done, settings.steps,
                            f"saved {saved[-1]} (load it and connect it to the trainer's resume input to continue)"
                            if losses else "no step had finished, so no file was saved.")
            raise
        except (TLoraError, OSError) as exc:
            where = f" Last good file: {saved[-1]}." if saved else " No file was saved."
            raise TLoraError(f"{exc}{where}") from exc
        except Exception:
            # Anything else (out of memory, say) keeps its type, so ComfyUI's own handling still
            # applies; the log says what survived.
            logging.error("T-LoRA: training stopped at step %d of %d. %s", start + len(losses), settings.steps,
                          f"Last good file: {saved[-1]}." if saved else "No file was saved.")
            raise
    # Hand on exactly what the file holds, so sampling now and loading the file later agree bit for bit.
    return TrainResult(load_tlora(saved[-1]), saved, losses, decode_previews(vae, preview_latents),
                       timesteps=timesteps, first_step=start + 1)


def decode_previews(vae, latents: list[torch.Tensor]) -> Optional[torch.Tensor]:
    """The preview latents as one IMAGE batch, decoded after training (the VAE never competes with the
    model being trained for memory); None when there were none."""
    if not latents:
        return None
    with torch.no_grad():
        images = vae.decode(torch.cat(latents)).float().cpu()
    # [n, frames, H, W, 3] from VAEs with a time axis (Qwen-Image's): one batch of frames, as VAEDecode does
    return images.reshape(-1, *images.shape[-3:]) if images.dim() == 5 else images


def check_resume(resume: TLora, config: TLoraConfig, settings: TrainSettings) -> int:
    """Steps already done by a T-LoRA given back to continue training; refuses a mismatched one."""
    if (resume.config.rank, resume.config.variant) != (config.rank, config.variant):
        raise TLoraError(f"cannot resume a {resume.config.variant} rank {resume.config.rank} T-LoRA as a "
                         f"{config.variant} rank {config.rank} one; set the same variant and rank.")
    done = int(resume.config.training.get("steps_done", 0))
    if done >= settings.steps:
        raise TLoraError(f"the T-LoRA to resume has already done {done} steps; set steps above {done}.")
    return done

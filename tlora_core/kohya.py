"""Train a T-LoRA with kohya-ss sd-scripts: `--network_module tlora_core.kohya` (pack root on PYTHONPATH).

sd-scripts (`train_network.py`, `sdxl_train_network.py`) imports this module and drives it like its own
`networks/lora.py`:
    create_network(1.0, network_dim, network_alpha, vae, text_encoder, unet, neuron_dropout=..., **network_args)
    create_network_from_weights(multiplier, file, vae, text_encoder, unet, weights_sd=None, for_inference=False, **kw)
    network.prepare_network(args) -> apply_to(text_encoder, unet, train_te, train_unet) -> load_weights(file)
    -> enable_gradient_checkpointing() -> prepare_optimizer_params(te_lr, unet_lr, default_lr)
    -> prepare_grad_etc(te, unet) -> on_epoch_start(te, unet) -> [get_trainable_params(), set_multiplier(m)]
    -> save_weights(file, dtype, metadata).
`apply_max_norm_regularization` is deliberately absent: dW = B S A - B0 S0 A0 cannot be rescaled by scaling the
factors, and train_network.py turns `--scale_weight_norms` off with a warning when a network lacks the method.

How the timestep reaches the adapters, with sd-scripts left untouched: a forward pre-hook on the UNet reads its
timestep argument (2nd positional, or `timestep=` for SD1.x/2.x, `timesteps=` for SD-XL), turns it into one
prefix mask per batch row (r(t) of Sec. 3.2, M_t of Eq. 3) and keeps them for that call; a forward hook on every adapted Linear adds
multiplier * dW(t_i) x_i (Eq. 6) row by row. The masks of a grad-enabled call stay in place until the next
call, so gradient checkpointing recomputes with the same masks; a no-grad call in between (sd-scripts'
differential output preservation, sample images) puts the previous masks back when it ends.

The file written is this pack's T-LoRA format (tlora_core.format) with kohya layer names
`lora_unet_<module path, dots as underscores>`: diffusers paths for SD1.x/2.x, ldm paths (`input_blocks_...`)
for SD-XL, both of which ComfyUI's LoRA key map resolves. Imports: torch and safetensors only.
"""
from __future__ import annotations

import logging
import os
import re
import uuid
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from .adapter import LayerFactors, delta_weight, masked_delta
from .config import TLoraConfig
from .errors import TLoraConfigError, TLoraError, TLoraFormatError
from .format import TLora, load_tlora, parse_tlora, read_safetensors, save_tlora
from .hooks import CallMasks, add_delta
from .init import init_factors

logger = logging.getLogger(__name__)

PREFIX = "lora_unet_"
SOURCE = "kohya-sd-scripts"
# target token -> pattern on the Linear's module path inside sd-scripts' UNets (and the parent class it needs)
TARGET_PATTERNS = {
    "to_q": (r"\.attn[12]\.to_q$", "Attention"),
    "to_k": (r"\.attn[12]\.to_k$", "Attention"),
    "to_v": (r"\.attn[12]\.to_v$", "Attention"),
    "to_out": (r"\.attn[12]\.to_out\.0$", "Attention"),
    "ff": (r"\.ff\.net\.(0\.proj|2)$", "FeedForward"),
}
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out")
NETWORK_ARGS = ("min_rank", "variant", "init", "exponent", "targets", "seed", "trigger", "class_word")
# sd-scripts metadata too large or too private to copy into the settings record
DROPPED_METADATA = ("ss_dataset_dirs", "ss_reg_dataset_dirs", "ss_tag_frequency", "ss_bucket_info", "ss_datasets")
STORAGE_OF_DTYPE = {None: "fp32", torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def layer_name(module_path: str) -> str:
    """kohya layer key of a UNet module: `lora_unet_` + its path with dots replaced by underscores."""
    return PREFIX + module_path.replace(".", "_")


def base_model_of(unet: nn.Module) -> str:
    """SDXL for sd-scripts' SdxlUNet2DConditionModel (ldm layout), SD2 for 1024-wide cross-attention, else SD15."""
    if "Sdxl" in type(unet).__name__ or hasattr(unet, "input_blocks"):
        return "SDXL"
    for name, module in unet.named_modules():
        if name.endswith("attn2.to_k") and isinstance(module, nn.Linear):
            return "SD2" if module.in_features == 1024 else "SD15"
    return "SD15"


def _parent_class(unet: nn.Module, path: str) -> str:
    parts = path.split(".")
    for cut in range(len(parts) - 1, 0, -1):  # to_out.0 and ff.net.2 sit below a ModuleList
        name = type(unet.get_submodule(".".join(parts[:cut]))).__name__
        if name not in ("ModuleList", "Sequential", "GEGLU"):
            return name
    return ""


def find_targets(unet: nn.Module, targets: tuple[str, ...]) -> dict[str, tuple[str, nn.Linear]]:
    """Adapted Linears by layer key: {layer key: (module path, module)} in module order."""
    unknown = [t for t in targets if t not in TARGET_PATTERNS]
    if unknown or not targets:
        raise TLoraConfigError(f"unknown targets {unknown or targets!r}; choose from {', '.join(TARGET_PATTERNS)} "
                               f"(e.g. targets=to_q,to_k,to_v,to_out,ff).")
    patterns = [(re.compile(TARGET_PATTERNS[t][0]), TARGET_PATTERNS[t][1]) for t in targets]
    found = {}
    for path, module in unet.named_modules():
        if isinstance(module, nn.Linear) and any(
                rx.search(path) and parent in _parent_class(unet, path) for rx, parent in patterns):
            found[layer_name(path)] = (path, module)
    if not found:
        raise TLoraConfigError(f"no Linear layer of {type(unet).__name__} matches targets {','.join(targets)}; "
                               f"is this an sd-scripts UNet (SD1.x/2.x or SD-XL)?")
    return found


def parse_network_args(network_dim, kwargs: dict) -> tuple[TLoraConfig, tuple[str, ...], int]:
    """--network_dim and --network_args (strings) -> (settings, targets, init seed)."""
    unknown = sorted(set(kwargs) - set(NETWORK_ARGS))
    if unknown:
        raise TLoraConfigError(f"unsupported --network_args {unknown} for tlora_core.kohya; it knows "
                               f"{', '.join(NETWORK_ARGS)} (LoRA+, block dims/lr, dropouts and conv layers "
                               f"are not offered).")
    try:
        rank = 64 if network_dim is None else int(network_dim)
        min_rank = int(kwargs.get("min_rank", max(rank // 2, 1)))
        exponent = float(kwargs.get("exponent", 1.0))
        # sd-scripts seeds torch's generator (--seed) before creating the network, so this is reproducible
        seed = int(kwargs["seed"]) if "seed" in kwargs else int(torch.randint(0, 2 ** 31 - 1, (1,)).item())
    except ValueError as exc:
        raise TLoraConfigError(f"--network_dim / --network_args hold a value that is not a number ({exc}).") from exc
    targets = tuple(t.strip() for t in str(kwargs.get("targets", ",".join(DEFAULT_TARGETS))).split(",") if t.strip())
    config = TLoraConfig(rank=rank, min_rank=min_rank, exponent=exponent,
                         variant=str(kwargs.get("variant", "tlora")), init=str(kwargs.get("init", "last")),
                         trigger=str(kwargs.get("trigger", "")), class_word=str(kwargs.get("class_word", "")),
                         source=SOURCE)
    return config, targets, seed


def _check_no_dropout(*values):
    for value in values:
        if value not in (None, "None", "none", "", 0, 0.0, "0", "0.0"):
            raise TLoraConfigError(f"--network_dropout {value!r} is not supported by T-LoRA; leave it unset.")


def timesteps_of_call(args: tuple, kwargs: dict) -> torch.Tensor:
    """The timesteps of one UNet call, one per batch row (sd-scripts: forward(sample, timestep(s), ...))."""
    t = next((kwargs[k] for k in ("timestep", "timesteps", "t") if k in kwargs), None)
    if t is None:
        if len(args) < 2:
            raise TLoraError("T-LoRA: the UNet was called without a timestep argument (expected the second "
                             "positional argument or timestep= / timesteps=); the rank mask needs t.")
        t = args[1]
    sample = args[0] if args else next((kwargs[k] for k in ("sample", "x") if k in kwargs), None)
    t = torch.as_tensor(t).reshape(-1)
    batch = t.shape[0] if sample is None else sample.shape[0]
    if t.shape[0] == 1 and batch > 1:
        t = t.expand(batch)
    if t.shape[0] != batch:
        raise TLoraError(f"T-LoRA: {t.shape[0]} timesteps for a batch of {batch} samples.")
    return t


class TLoraAdapter(nn.Module):
    """Factors of one adapted Linear: trainable down / up / scale parameters, frozen base_* buffers."""

    def __init__(self, name: str, factors: LayerFactors):
        super().__init__()
        self.lora_name = name
        # contiguous copies: the same values give the same results whether they come from init or a file
        own = lambda t: None if t is None else t.detach().clone(memory_format=torch.contiguous_format)  # noqa: E731
        self.down, self.up = nn.Parameter(own(factors.down)), nn.Parameter(own(factors.up))
        self.scale = None if factors.scale is None else nn.Parameter(own(factors.scale))
        for field_name in ("base_down", "base_up", "base_scale"):
            self.register_buffer(field_name, own(getattr(factors, field_name)))

    def factors(self) -> LayerFactors:
        return LayerFactors(down=self.down, up=self.up, scale=self.scale, base_down=self.base_down,
                            base_up=self.base_up, base_scale=self.base_scale)

    def load_factors(self, f: LayerFactors):
        """Copy a file's factors in place (optimizer references stay valid)."""
        with torch.no_grad():
            for name, value in f.tensors().items():
                mine = getattr(self, name)
                if mine is None or mine.shape != value.shape:
                    raise TLoraFormatError(f"layer {self.lora_name}: {name} of shape {tuple(value.shape)} does not "
                                           f"fit the network ({None if mine is None else tuple(mine.shape)}).")
                mine.copy_(value)


class TLoraNetwork(nn.Module):
    """The network object sd-scripts trains; adapters live in `layers`, the UNet is never registered here."""

    def __init__(self, config: TLoraConfig, factors: dict[str, LayerFactors],
                 targets: dict[str, tuple[str, nn.Linear]], multiplier: float = 1.0, settings: Optional[dict] = None):
        super().__init__()
        self.config, self.multiplier = config, float(multiplier)
        self.settings = dict(settings or {})  # targets / seed, recorded in the file
        self.layers = nn.ModuleDict({name: TLoraAdapter(name, f) for name, f in factors.items()})
        self._targets = targets  # plain dict: the UNet's modules must not become part of the network
        self._handles: list = []
        self.current: Optional[CallMasks] = None
        self._saved_current: list = []
        self.full_rank = CallMasks([config.rank], torch.ones(1, config.rank))

    # --- hooks ---------------------------------------------------------------------------------
    def apply_to(self, text_encoder, unet, apply_text_encoder: bool = True, apply_unet: bool = True):
        """Hook the UNet (timestep reader) and every adapted Linear; the text encoders are never adapted."""
        if not apply_unet:
            raise TLoraConfigError("T-LoRA adapts the UNet only; drop --network_train_text_encoder_only.")
        if self._handles:
            raise TLoraError("this T-LoRA network is already applied to a UNet.")
        if apply_text_encoder:
            logger.warning("T-LoRA trains no text-encoder layers; pass --network_train_unet_only to save memory.")
        self._handles.append(unet.register_forward_pre_hook(self._before_unet_call, with_kwargs=True))
        self._handles.append(unet.register_forward_hook(self._after_unet_call))
        for name, adapter in self.layers.items():
            self._handles.append(self._targets[name][1].register_forward_hook(self._layer_hook(adapter)))
        logger.info("T-LoRA: %s rank %d r_min %d on %d UNet layers (%s).", self.config.variant, self.config.rank,
                    self.config.schedule_min_rank, len(self.layers), self.config.base_model)

    def remove(self):
        """Take every hook off again: the UNet computes exactly as before apply_to."""
        for handle in self._handles:
            handle.remove()
        self._handles, self.current, self._saved_current = [], None, []

    def _before_unet_call(self, module, args, kwargs):
        self._saved_current.append((torch.is_grad_enabled(), self.current))
        t = timesteps_of_call(args, kwargs)
        c = self.config
        device = (args[0] if args else t).device
        self.current = CallMasks.for_timesteps(t, c.rank, c.schedule_min_rank, c.exponent, c.max_timestep, device)

    def _after_unet_call(self, module, args, output):
        grad_enabled, previous = self._saved_current.pop() if self._saved_current else (True, None)
        if not grad_enabled:  # no backward follows: give a pending backward (checkpointing) its masks back
            self.current = previous
        return None

    def _layer_hook(self, adapter: TLoraAdapter):
        def delta(x, masks, active):
            return masked_delta(x, adapter.factors(), masks, active)

        def hook(module, args, output):
            if self.multiplier == 0:
                return None
            call = self.current
            if call is None:
                if self.config.masked:
                    raise TLoraError(f"T-LoRA layer {adapter.lora_name} ran outside a UNet call, so t is unknown; "
                                     f"call the UNet the network was applied to.")
                call = self.full_rank  # an unmasked variant needs no t
            return add_delta(output, args[0], call, self.multiplier, delta, adapter.lora_name)
        return hook

    # --- what train_network.py calls -------------------------------------------------------------
    def prepare_network(self, args):
        """Called with sd-scripts' parsed arguments before apply_to: refuse a save format we cannot write."""
        fmt = getattr(args, "save_model_as", "safetensors")
        if fmt != "safetensors":
            raise TLoraConfigError(f"--save_model_as {fmt!r}: a T-LoRA is saved as .safetensors only; "
                                   f"use --save_model_as safetensors.")

    def set_multiplier(self, multiplier: float):
        self.multiplier = float(multiplier)

    def prepare_optimizer_params(self, text_encoder_lr=None, unet_lr=None, default_lr=None):
        """One parameter group of the trainable factors (base_* are buffers: no grad, no optimizer state)."""
        self.requires_grad_(True)
        group = {"params": list(self.parameters())}
        lr = unet_lr if unet_lr is not None else default_lr
        if lr is not None:
            group["lr"] = lr
        return [group], ["unet"]

    def enable_gradient_checkpointing(self):
        """Nothing to do: the adapters run inside the UNet's own checkpointed blocks."""

    def prepare_grad_etc(self, text_encoder, unet):
        self.requires_grad_(True)

    def on_epoch_start(self, text_encoder, unet):
        self.train()

    def get_trainable_params(self):
        return [p for p in self.parameters() if p.requires_grad]

    def is_mergeable(self) -> bool:
        return False  # dW depends on t: it cannot be merged into fixed weights

    def merge_to(self, text_encoder, unet, weights_sd, dtype, device):
        raise TLoraError("a T-LoRA cannot be merged into the base weights (--base_weights): its update "
                         "changes with the timestep. Export it to a standard LoRA first.")

    # --- files ------------------------------------------------------------------------------------
    def to_tlora(self, metadata: Optional[dict] = None) -> TLora:
        """The network as this pack's in-memory T-LoRA (detached float32 CPU copies)."""
        training = {k: v for k, v in (metadata or {}).items() if k.startswith("ss_") and k not in DROPPED_METADATA}
        training.update(self.settings)
        config = self.config.replace(source=SOURCE, training=training)
        layers = {name: LayerFactors(**{k: v.detach().to("cpu", torch.float32).clone()
                                        for k, v in a.factors().tensors().items()})
                  for name, a in self.layers.items()}
        return TLora(config=config, layers=layers)

    def save_weights(self, file, dtype=None, metadata=None):
        """Write the T-LoRA file; an existing file of that name is replaced atomically (as sd-scripts does)."""
        path = Path(file)
        if path.suffix != ".safetensors":
            raise TLoraError(f"{path}: a T-LoRA is saved as .safetensors only; use --save_model_as safetensors.")
        if dtype not in STORAGE_OF_DTYPE:
            raise TLoraError(f"cannot store a T-LoRA as {dtype}; use --save_precision float, fp16 or bf16.")
        tlora = self.to_tlora(metadata)
        if not path.exists():
            save_tlora(tlora, path, STORAGE_OF_DTYPE[dtype])
        else:
            # hidden, and not a model extension: no LoRA list shows it while it is being written
            tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.partial")
            try:
                save_tlora(tlora, tmp, STORAGE_OF_DTYPE[dtype])
                os.replace(tmp, path)
            finally:
                if tmp.exists():
                    tmp.unlink()
        logger.info("T-LoRA: saved %d layers to %s.", len(tlora.layers), path)

    def load_weights(self, file) -> str:
        """Load a T-LoRA file written by save_weights (trained and frozen factors) into this network."""
        tlora = load_tlora(file)
        c, mine = tlora.config, self.config
        if (c.rank, c.ortho) != (mine.rank, mine.ortho):
            raise TLoraFormatError(f"{file} is a {c.variant} of rank {c.rank}; this network is a {mine.variant} of "
                                   f"rank {mine.rank}. Match --network_dim and variant= to the file.")
        unexpected = sorted(set(tlora.layers) - set(self.layers))
        if unexpected:
            raise TLoraFormatError(f"{file} holds {len(unexpected)} layers this network lacks (e.g. {unexpected[0]}); "
                                   f"it was trained on another model or with other targets=.")
        for name, f in tlora.layers.items():
            self.layers[name].load_factors(f)
        missing = len(self.layers) - len(tlora.layers)
        kept = f", {missing} layers kept their init" if missing else ""
        return f"loaded {len(tlora.layers)} layers from {file}{kept}"

    def delta_weights(self, t: float) -> dict[str, torch.Tensor]:
        """Dense dW(t) per layer (float32), for checks and exports."""
        c = self.config
        call = CallMasks.for_timesteps(torch.tensor([float(t)]), c.rank, c.schedule_min_rank, c.exponent,
                                       c.max_timestep)
        mask = call.masks[0]
        return {name: delta_weight(a.factors(), mask).detach() for name, a in self.layers.items()}


def create_network(multiplier, network_dim, network_alpha, vae, text_encoder, unet, neuron_dropout=None, **kwargs):
    """A fresh T-LoRA network on `unet` (sd-scripts calls this; --network_args arrive as strings in kwargs)."""
    _check_no_dropout(neuron_dropout, kwargs.pop("dropout", None))
    config, targets, seed = parse_network_args(network_dim, kwargs)
    config = config.replace(base_model=base_model_of(unet))
    if network_alpha not in (None, 1, 1.0):
        logger.warning("T-LoRA ignores --network_alpha %s: its update has no alpha/rank scale.", network_alpha)
    found = find_targets(unet, targets)
    factors = {name: init_factors(config.ortho, m.in_features, m.out_features, config.rank, config.init, seed, name)
               for name, (_, m) in found.items()}
    return TLoraNetwork(config, factors, found, multiplier, {"targets": list(targets), "init_seed": seed})


def create_network_from_weights(multiplier, file, vae, text_encoder, unet, weights_sd=None, for_inference=False,
                                **kwargs):
    """A network rebuilt from a T-LoRA file: its settings, its layers, its factors. Returns (network, tensors).

    kwargs may override the schedule (min_rank, exponent); variant, if given, must match the file.
    """
    _check_no_dropout(kwargs.pop("dropout", None))
    unknown = sorted(set(kwargs) - set(NETWORK_ARGS))
    if unknown:
        raise TLoraConfigError(f"unsupported --network_args {unknown} for tlora_core.kohya.")
    tensors, metadata = read_safetensors(file)
    tlora = parse_tlora(weights_sd if weights_sd is not None else tensors, metadata, str(file))
    config = tlora.config
    if "variant" in kwargs and kwargs["variant"] != config.variant:
        raise TLoraConfigError(f"variant={kwargs['variant']} but {file} is a {config.variant}.")
    overrides = {k: conv(kwargs[k]) for k, conv in (("min_rank", int), ("exponent", float)) if k in kwargs}
    config = config.replace(**overrides)
    linears = {layer_name(p): (p, m) for p, m in unet.named_modules() if isinstance(m, nn.Linear)}
    missing = [k for k in tlora.layers if k not in linears]
    if missing:
        raise TLoraFormatError(f"{len(missing)} layers of {file} (e.g. {missing[0]}) are not Linear layers of this "
                               f"UNet ({base_model_of(unet)}); it was trained on "
                               f"{config.base_model or 'another model'}.")
    for key, f in tlora.layers.items():
        m = linears[key][1]
        if (f.out_features, f.in_features) != (m.out_features, m.in_features):
            raise TLoraFormatError(f"layer {key} of {file} is [{f.out_features}, {f.in_features}], the UNet's is "
                                   f"[{m.out_features}, {m.in_features}]: another base model.")
    targets = {k: linears[k] for k in tlora.layers}
    settings = {k: config.training[k] for k in ("targets", "init_seed") if k in config.training}
    return TLoraNetwork(config, tlora.layers, targets, multiplier, settings), tensors

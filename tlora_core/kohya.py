"""Train a T-LoRA with kohya-ss sd-scripts: `--network_module tlora_core.kohya` (pack root on PYTHONPATH).

sd-scripts (`train_network.py`, `sdxl_train_network.py`, `flux_train_network.py`) imports this module and drives
it like its own `networks/lora.py` / `networks/lora_flux.py` (for Flux, `unet` is the Flux transformer and
`text_encoder` the list [CLIP-L, T5-XXL]):
    create_network(1.0, network_dim, network_alpha, vae, text_encoder, unet, neuron_dropout=..., **network_args)
    create_network_from_weights(multiplier, file, vae, text_encoder, unet, weights_sd=None, for_inference=False, **kw)
    network.prepare_network(args) -> apply_to(text_encoder, unet, train_te, train_unet) -> load_weights(file)
    -> enable_gradient_checkpointing() -> prepare_optimizer_params(te_lr, unet_lr, default_lr)
    -> prepare_grad_etc(te, unet) -> on_epoch_start(te, unet) -> [get_trainable_params(), set_multiplier(m)]
    -> save_weights(file, dtype, metadata).
`apply_max_norm_regularization` is deliberately absent: dW = B S A - B0 S0 A0 cannot be rescaled by scaling the
factors, and train_network.py turns `--scale_weight_norms` off with a warning when a network lacks the method.

How the timestep reaches the adapters, with sd-scripts left untouched: a forward pre-hook on the UNet reads its
timestep argument (2nd positional, or `timestep=` for SD1.x/2.x, `timesteps=` for SD-XL and Flux), scales it to
the paper's t (Flux gets sigma = timesteps / 1000, so t = 1000 sigma), turns it into one prefix mask per batch
row (r(t) of Sec. 3.2, M_t of Eq. 3) and keeps them for that call; a forward hook on every adapted Linear adds
multiplier * dW(t_i) x_i (Eq. 6) row by row. The masks of a grad-enabled call stay in place until the next
call, so gradient checkpointing recomputes with the same masks; a no-grad call in between (sample images) or
a call at multiplier 0 (sd-scripts' differential output preservation prior, grad-enabled under Flux) puts the
previous masks back when it ends, and the latter's output leaves nothing for backward.

The file written is this pack's T-LoRA format (tlora_core.format) with kohya layer names
`lora_unet_<module path, dots as underscores>`: diffusers paths for SD1.x/2.x, ldm paths (`input_blocks_...`)
for SD-XL, both of which ComfyUI's LoRA key map resolves. Flux's layers come from its entry in
tlora_core.families and keep ComfyUI's names (`diffusion_model.<path>`, and `diffusion_model.<path>.q|k|v` for
one projection of a fused qkv / linear1 weight, whose rows the file records in TLoraConfig.fused), which
sd-scripts' Flux shares with ComfyUI's (both follow BFL's layout). Imports: torch and safetensors only.
"""
from __future__ import annotations

import logging
import os
import re
import uuid
from pathlib import Path
from typing import NamedTuple, Optional

import torch
from torch import nn

from .adapter import LayerFactors, delta_weight, masked_delta
from .config import TLoraConfig
from .errors import TLoraConfigError, TLoraError, TLoraFormatError
from .families import PAPER, Family, family_for, find_sites
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
DIT_PREFIX = "diffusion_model."


class TimestepArg(NamedTuple):
    """Where a model's forward takes its timestep, and how it relates to the paper's t."""

    index: int          # position among forward's positional arguments (by keyword: timestep(s)=)
    scale: float = 1.0  # the argument times this is the paper's t in [0, T]


UNET_TIMESTEP = TimestepArg(1)  # sd-scripts' UNets: forward(sample, timestep(s), ...), t in [0, 1000)
# The DiT families (names of tlora_core.families) this module serves. Flux (and Chroma): forward(img, img_ids,
# txt, txt_ids, timesteps, ...), called by flux_train_network.py with timesteps / 1000, the flow time sigma in
# [0, 1]; the paper's t of a flow model is 1000 sigma.
DIT_TIMESTEPS = {"Flux": TimestepArg(4, 1000.0)}
NETWORK_ARGS = ("min_rank", "variant", "init", "exponent", "targets", "seed", "trigger", "class_word")
# sd-scripts metadata too large or too private to copy into the settings record
DROPPED_METADATA = ("ss_dataset_dirs", "ss_reg_dataset_dirs", "ss_tag_frequency", "ss_bucket_info", "ss_datasets")
STORAGE_OF_DTYPE = {None: "fp32", torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


class Target(NamedTuple):
    """Where one adapter sits: a Linear of sd-scripts' model and, for a fused weight, its output rows."""

    path: str                               # module path inside the model sd-scripts hands over
    module: nn.Linear
    rows: Optional[tuple[int, int]] = None  # (offset, size) of one projection of a fused weight


def layer_name(module_path: str) -> str:
    """kohya layer key of a UNet module: `lora_unet_` + its path with dots replaced by underscores."""
    return PREFIX + module_path.replace(".", "_")


def base_model_of(unet: nn.Module) -> str:
    """ComfyUI's config class name for sd-scripts' model: Chroma, Flux or FluxSchnell (no guidance input) for
    BFL's layout (double_blocks, single_blocks), SDXL for SdxlUNet2DConditionModel (ldm layout), SD2 for
    1024-wide cross-attention, else SD15."""
    if hasattr(unet, "double_blocks") and hasattr(unet, "single_blocks"):
        if any(cls.__name__ == "Chroma" for cls in type(unet).__mro__):
            return "Chroma"
        return "Flux" if getattr(getattr(unet, "params", None), "guidance_embed", True) else "FluxSchnell"
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


def dit_family(base_model: str) -> Optional[Family]:
    """The families entry of a DiT this module serves, None for the UNets (kohya names, TARGET_PATTERNS)."""
    family = family_for(base_model)
    return family if family is not None and family.name in DIT_TIMESTEPS else None


def find_dit_targets(model: nn.Module, family: Family, targets: tuple[str, ...]) -> dict[str, Target]:
    """Adapted Linears of a DiT by ComfyUI layer key, from the family's target rules (tlora_core.families):
    a fused weight gets one adapter per projection, each on its own output rows."""
    if len(targets) != 1:
        raise TLoraConfigError(f"targets={','.join(targets)} for {family.name}: name one target set of "
                               f"{', '.join(family.targets)} (e.g. targets=attention).")
    found = {}
    for key, site in find_sites(model, family.rules(targets[0])).items():
        path = site.module_path[len(DIT_PREFIX):]
        module = model.get_submodule(path)
        if not isinstance(module, nn.Linear):
            raise TLoraConfigError(f"{path} of {type(model).__name__} is a {type(module).__name__}, not a Linear; "
                                   f"T-LoRA adapts Linear layers only.")
        found[key] = Target(path, module, site.rows)
    if not found:
        raise TLoraConfigError(f"no Linear layer of {type(model).__name__} matches the {family.name} targets "
                               f"{targets[0]}; is this sd-scripts' {family.name} model?")
    return found


def find_targets(unet: nn.Module, targets: tuple[str, ...]) -> dict[str, Target]:
    """Adapted Linears of a UNet by kohya layer key, in module order."""
    unknown = [t for t in targets if t not in TARGET_PATTERNS]
    if unknown or not targets:
        raise TLoraConfigError(f"unknown targets {unknown or targets!r}; choose from {', '.join(TARGET_PATTERNS)} "
                               f"(e.g. targets=to_q,to_k,to_v,to_out,ff).")
    patterns = [(re.compile(TARGET_PATTERNS[t][0]), TARGET_PATTERNS[t][1]) for t in targets]
    found = {}
    for path, module in unet.named_modules():
        if isinstance(module, nn.Linear) and any(
                rx.search(path) and parent in _parent_class(unet, path) for rx, parent in patterns):
            found[layer_name(path)] = Target(path, module)
    if not found:
        raise TLoraConfigError(f"no Linear layer of {type(unet).__name__} matches targets {','.join(targets)}; "
                               f"is this an sd-scripts UNet (SD1.x/2.x or SD-XL)?")
    return found


def parse_network_args(network_dim, kwargs: dict, base_model: str = "") -> tuple[TLoraConfig, tuple[str, ...], int]:
    """--network_dim and --network_args (strings) -> (settings, targets, init seed).

    What is left unset comes from the family's recipe (tlora_core.families; the paper's when the family is
    unknown): SD T-LoRA rank 64, r_min r/2; Flux Vanilla T-LoRA rank 32, r_min 1 (the same share of a set rank).
    """
    unknown = sorted(set(kwargs) - set(NETWORK_ARGS))
    if unknown:
        raise TLoraConfigError(f"unsupported --network_args {unknown} for tlora_core.kohya; it knows "
                               f"{', '.join(NETWORK_ARGS)} (LoRA+, block dims/lr, dropouts, conv layers and "
                               f"text-encoder layers are not offered).")
    family = family_for(base_model)
    recipe = PAPER if family is None else family.recipe
    try:
        rank = recipe.rank if network_dim is None else int(network_dim)
        min_rank = int(kwargs["min_rank"]) if "min_rank" in kwargs else recipe.resolve(rank=rank)["min_rank"]
        exponent = float(kwargs.get("exponent", 1.0))
        # sd-scripts seeds torch's generator (--seed) before creating the network, so this is reproducible
        seed = int(kwargs["seed"]) if "seed" in kwargs else int(torch.randint(0, 2 ** 31 - 1, (1,)).item())
    except ValueError as exc:
        raise TLoraConfigError(f"--network_dim / --network_args hold a value that is not a number ({exc}).") from exc
    default_targets = "attention" if dit_family(base_model) else ",".join(DEFAULT_TARGETS)
    targets = tuple(t.strip() for t in str(kwargs.get("targets", default_targets)).split(",") if t.strip())
    config = TLoraConfig(rank=rank, min_rank=min_rank, exponent=exponent,
                         variant=str(kwargs.get("variant", recipe.variant)), init=str(kwargs.get("init", "last")),
                         trigger=str(kwargs.get("trigger", "")), class_word=str(kwargs.get("class_word", "")),
                         source=SOURCE)
    return config, targets, seed


def _check_no_dropout(*values):
    for value in values:
        if value not in (None, "None", "none", "", 0, 0.0, "0", "0.0"):
            raise TLoraConfigError(f"--network_dropout {value!r} is not supported by T-LoRA; leave it unset.")


def timesteps_of_call(args: tuple, kwargs: dict, where: TimestepArg = UNET_TIMESTEP) -> torch.Tensor:
    """The paper's t of one model call, one per batch row.

    A scaled argument (Flux's sigma) is taken as passed, converted to float32, then scaled: t = 1000 sigma in
    float32. That is not always the product the model's own time embedding forms: under bf16 Flux multiplies
    in bf16, whose step is 4 between 512 and 1024 (sigma 0.93359375: the model embeds 932.0, the mask here
    follows 933.59), so at a rank boundary the two can fall on different sides.
    """
    t = next((kwargs[k] for k in ("timestep", "timesteps", "t") if k in kwargs), None)
    if t is None:
        if len(args) <= where.index:
            raise TLoraError(f"T-LoRA: the model was called without a timestep argument (expected positional "
                             f"argument {where.index + 1} or timestep= / timesteps=); the rank mask needs t.")
        t = args[where.index]
    sample = args[0] if args else next((kwargs[k] for k in ("sample", "x", "img") if k in kwargs), None)
    t = torch.as_tensor(t).reshape(-1)
    if where.scale != 1.0:
        t = t.float() * where.scale
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

    # flux_train_network.py reads this after create_network: no T5-XXL layer is adapted (nor CLIP-L), so the
    # text encoders' outputs can be cached (--cache_text_encoder_outputs).
    train_t5xxl = False

    def __init__(self, config: TLoraConfig, factors: dict[str, LayerFactors], targets: dict[str, Target],
                 multiplier: float = 1.0, settings: Optional[dict] = None, timestep_arg: TimestepArg = UNET_TIMESTEP):
        super().__init__()
        self.config, self.multiplier, self.timestep_arg = config, float(multiplier), timestep_arg
        self.settings = dict(settings or {})  # targets / seed, recorded in the file
        # Module names cannot hold dots, ComfyUI layer keys do (diffusion_model.<path>.q): the registered name
        # has them as underscores (kohya keys have none), `layers` maps the layer keys themselves.
        self.adapters = nn.ModuleDict({name.replace(".", "_"): TLoraAdapter(name, f) for name, f in factors.items()})
        if len(self.adapters) != len(factors):
            raise TLoraError("two layer keys of this network differ only in '.' against '_'.")
        self.layers: dict[str, TLoraAdapter] = {a.lora_name: a for a in self.adapters.values()}
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
            self._handles.append(self._targets[name].module.register_forward_hook(self._layer_hook(adapter)))
        logger.info("T-LoRA: %s rank %d r_min %d on %d UNet layers (%s).", self.config.variant, self.config.rank,
                    self.config.schedule_min_rank, len(self.layers), self.config.base_model)

    def remove(self):
        """Take every hook off again: the UNet computes exactly as before apply_to."""
        for handle in self._handles:
            handle.remove()
        self._handles, self.current, self._saved_current = [], None, []

    def _before_unet_call(self, module, args, kwargs):
        # only a call with gradients and the adapters on is recomputed in backward with the masks then in force
        recomputable = torch.is_grad_enabled() and self.multiplier != 0
        self._saved_current.append((recomputable, self.current))
        t = timesteps_of_call(args, kwargs, self.timestep_arg)
        c = self.config
        device = (args[0] if args else t).device
        self.current = CallMasks.for_timesteps(t, c.rank, c.schedule_min_rank, c.exponent, c.max_timestep, device)

    def _after_unet_call(self, module, args, output):
        """After a no-grad call or a call at multiplier 0, put the previous call's masks back for its pending
        backward (gradient checkpointing recomputes it then).

        A call at multiplier 0 is sd-scripts' differential output preservation prior: sd-scripts wraps it in
        no_grad, but flux_train_network.py's call_dit enables gradients again, and the prior becomes part of
        the loss's target. Its output is detached, as under no_grad: a recomputation of it in backward would
        run at the multiplier in force then (1) with another call's masks.
        """
        recomputable, previous = self._saved_current.pop() if self._saved_current else (True, None)
        if recomputable:
            return None
        self.current = previous
        # sd-scripts' Flux returns one tensor
        return output.detach() if isinstance(output, torch.Tensor) and output.requires_grad else None

    def _layer_hook(self, adapter: TLoraAdapter):
        rows = self._targets[adapter.lora_name].rows

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
            return add_delta(output, args[0], call, self.multiplier, delta, adapter.lora_name, rows)
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


def timestep_arg_of(base_model: str) -> TimestepArg:
    """How the model sd-scripts trains takes its timestep (see DIT_TIMESTEPS)."""
    family = dit_family(base_model)
    return UNET_TIMESTEP if family is None else DIT_TIMESTEPS[family.name]


def svd_device(unet: nn.Module) -> torch.device:
    """Where the Ortho-LoRA SVDs run: the GPU the model is on, else the current CUDA device, else the CPU.

    sd-scripts creates the network while the model still sits on the CPU (it moves it to the accelerator
    later), and accelerate has already made each process's own GPU the current one. CUDA only: the SVDs
    run in float64, which MPS lacks.
    """
    device = next((p.device for p in unet.parameters() if p.device.type == "cuda"), None)
    if device is None and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    return device or torch.device("cpu")


def create_network(multiplier, network_dim, network_alpha, vae, text_encoder, unet, neuron_dropout=None, **kwargs):
    """A fresh T-LoRA network on `unet` (sd-scripts calls this; --network_args arrive as strings in kwargs)."""
    _check_no_dropout(neuron_dropout, kwargs.pop("dropout", None))
    base_model = base_model_of(unet)
    config, targets, seed = parse_network_args(network_dim, kwargs, base_model)
    if network_alpha not in (None, 1, 1.0):
        logger.warning("T-LoRA ignores --network_alpha %s: its update has no alpha/rank scale.", network_alpha)
    dit = dit_family(base_model)
    found = find_targets(unet, targets) if dit is None else find_dit_targets(unet, dit, targets)
    family = family_for(base_model)
    fused = {key: [DIT_PREFIX + t.path, t.rows[0], t.rows[1], t.module.out_features]
             for key, t in found.items() if t.rows is not None}
    config = config.replace(base_model=base_model, family="" if family is None else family.name, fused=fused)
    svd_on = svd_device(unet) if config.ortho else None
    home = next((p.device for p in unet.parameters()), torch.device("cpu"))  # factors live beside the model
    factors = {name: init_factors(config.ortho, t.module.in_features, t.rows[1] if t.rows else t.module.out_features,
                                  config.rank, config.init, seed, name, device=svd_on).to(home)
               for name, t in found.items()}
    return TLoraNetwork(config, factors, found, multiplier, {"targets": list(targets), "init_seed": seed},
                        timestep_arg_of(base_model))


def targets_of_file(unet: nn.Module, tlora: TLora, file) -> dict[str, Target]:
    """The Linears of `unet` that a file's layers sit on: by kohya name (lora_unet_<path>), by ComfyUI name
    (diffusion_model.<path>), and for one projection of a fused weight by the module and rows the file records."""
    linears = {}
    for path, m in unet.named_modules():
        if isinstance(m, nn.Linear):
            linears[layer_name(path)] = linears[DIT_PREFIX + path] = Target(path, m)
    found, fused = {}, tlora.config.fused
    for key in tlora.layers:
        if key in fused:
            module_path, offset, size, total = fused[key]
            target = linears.get(module_path)
            if target is not None and target.module.out_features == total:
                found[key] = target._replace(rows=(offset, size))
        elif key in linears:
            found[key] = linears[key]
    missing = [k for k in tlora.layers if k not in found]
    if missing:
        raise TLoraFormatError(f"{len(missing)} layers of {file} (e.g. {missing[0]}) are not Linear layers of this "
                               f"model ({base_model_of(unet)}); it was trained on "
                               f"{tlora.config.base_model or 'another model'}.")
    for key, f in tlora.layers.items():
        t = found[key]
        rows = t.rows[1] if t.rows else t.module.out_features
        if (f.out_features, f.in_features) != (rows, t.module.in_features):
            raise TLoraFormatError(f"layer {key} of {file} is [{f.out_features}, {f.in_features}], the model's is "
                                   f"[{rows}, {t.module.in_features}]: another base model.")
    return found


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
    targets = targets_of_file(unet, tlora, file)
    settings = {k: config.training[k] for k in ("targets", "init_seed") if k in config.training}
    return (TLoraNetwork(config, tlora.layers, targets, multiplier, settings, timestep_arg_of(base_model_of(unet))),
            tensors)

"""Readers of T-LoRA files written by other implementations, turned into this pack's `TLora`.

1. Reference SD-XL checkpoints (ControlGenAI/T-LoRA, `checkpoint-N/pytorch_lora_weights.safetensors`): one
   adapter per attention projection, keys `<processor path>.<to_q|to_k|to_v|to_out>_lora.<param>`.
   Ortho layers hold q_layer [r, in], p_layer [out, r], lambda_layer [1, r] and their frozen copies base_q,
   base_p, base_lambda; the reference forward p(q(x)·λ·m) − p0(q0(x)·λ0·m) is Eq. 6 with
   A = q, B = p, S = λ[0] (and A0, B0, S0 from the copies), so the mapping is exact, scale 1.
   Vanilla layers hold down [r, in] and up [out, r]: up(down(x)·m), i.e. A = down, B = up, no S.
   Layer key: `<processor path>.<proj>` (`...attn1.processor.to_out`), which ComfyUI's diffusers key map
   resolves. Note: a vanilla file has exactly the layout of an old diffusers attention-processor LoRA;
   only `hparams.yml` (or the user) says it is a T-LoRA.
2. Reference FLUX checkpoints (`checkpoint-N/lora.pt`, torch.save of the processors' state dict):
   vanilla down/up under `<block>.attn.processor.<proj>_lora.`, proj in to_q, to_k, to_v, to_out,
   to_q_proj, to_k_proj, to_v_proj (the last three adapt add_q/k/v_proj). Layer key
   `transformer.<block>.attn.<diffusers name>` (ComfyUI's Flux key map). Single-stream blocks carry
   to_out and *_proj adapters that their processor never calls (no to_out, no context stream there):
   they are dropped. Their schedule runs on t = 1000·sigma (base_model "Flux").
3. LyCORIS `algo=tlora` state dicts: `<name>.q_layer.weight`, `.p_layer.weight`, `.lambda_layer`, `.alpha`
   with ΔW = alpha/r · (P diag(λ·m) Q − P0 diag(λ0·m) Q0). alpha/r is folded into S and S0. LyCORIS does
   not store P0, Q0, λ0: on load it rebuilds them from the SVD of the pretrained weight W ('principal':
   the r largest singular triplets, by default). Without W this cannot be reproduced, so reading such a
   file needs `base_weights` (the model's weights by layer key, or a callable) and raises
   MissingBaseWeightsError otherwise. The rebuilt copies equal LyCORIS' own only if W is the very weight
   it was trained on, in the same precision: the frozen product is a truncation of W itself.

`read_any` sniffs this pack's own format too, and refuses ordinary LoRA files (LoraLoader reads those).
Schedule settings (r_min, exponent) are not in the reference weights; they come from `hparams.yml` beside
the checkpoint (or in `logs/` next to the `checkpoint-N` folders). Only the fields in HPARAM_FIELDS are
kept from it: that file may hold an API key in clear text, and nothing else of it is ever shown.
Explicit arguments (min_rank, exponent) override what a file says; without either, r_min = rank // 2.
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Optional, Union

import torch

from .adapter import LayerFactors
from .config import ORTHO_INITS, TLoraConfig
from .errors import TLoraConfigError, TLoraFormatError
from .families import family_for
from .format import (FORMAT_NAME, KEY_MARK, TLora, as_float32, checked_factors, is_tlora_metadata, parse_tlora,
                     read_safetensors)

logger = logging.getLogger(__name__)

BaseWeights = Union[Mapping[str, torch.Tensor], Callable[[str], Optional[torch.Tensor]]]

FORMAT_PACK = "comfyui-tlora"
FORMAT_REFERENCE_SDXL = "reference-sdxl"
FORMAT_REFERENCE_FLUX = "reference-flux"
FORMAT_LYCORIS = "lycoris-tlora"
FORMAT_STANDARD_LORA = "standard-lora"
FORMAT_UNKNOWN = "unknown"

REFERENCE_KEY = re.compile(
    r"^(?P<proc>.+\.processor)\.(?P<proj>to_q|to_k|to_v|to_out|to_q_proj|to_k_proj|to_v_proj)_lora\."
    r"(?P<param>q_layer\.weight|p_layer\.weight|lambda_layer|base_q\.weight|base_p\.weight|base_lambda"
    r"|down\.weight|up\.weight)$")
ORTHO_FIELDS = {"q_layer.weight": "down", "p_layer.weight": "up", "lambda_layer": "scale",
                "base_q.weight": "base_down", "base_p.weight": "base_up", "base_lambda": "base_scale"}
VANILLA_FIELDS = {"down.weight": "down", "up.weight": "up"}
# reference FLUX processor attribute -> diffusers module name below `<block>.attn.`
FLUX_TARGETS = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0",
                "to_q_proj": "add_q_proj", "to_k_proj": "add_k_proj", "to_v_proj": "add_v_proj"}
FLUX_SINGLE_UNUSED = ("to_out", "to_q_proj", "to_k_proj", "to_v_proj")
LYCORIS_FIELDS = {"q_layer.weight": "down", "p_layer.weight": "up", "lambda_layer": "scale", "alpha": "alpha",
                  "base_q.weight": "base_down", "base_p.weight": "base_up", "base_lambda": "base_scale"}
STANDARD_LORA_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".lora_A.weight", ".lora_B.weight",
                          ".lora.down.weight", ".lora_linear_layer.down.weight", ".hada_w1_a", ".hada_w2_a",
                          ".lokr_w1", ".lokr_w1_a", ".oft_blocks", ".oft_diag", ".diff", ".w_norm")
HPARAM_FIELDS = ("lora_rank", "rank", "min_rank", "alpha_rank_scale", "sig_type", "trainer_type",
                 "trainer_class", "tlora", "placeholder_token", "class_name")
HPARAMS_NAME = "hparams.yml"
ZIP_MAGIC, PICKLE_MAGIC = b"PK\x03\x04", b"\x80"


class MissingBaseWeightsError(TLoraFormatError):
    """A LyCORIS T-LoRA needs the model's weights to rebuild its frozen factors; `layer_keys` lists them."""

    def __init__(self, message: str, layer_keys: list[str]):
        super().__init__(message)
        self.layer_keys = layer_keys


# ---- files -----------------------------------------------------------------------------------------

def load_state_dict(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a .safetensors file or of a torch.save'd dict (read with weights_only)."""
    path = Path(path)
    if not path.is_file():
        raise TLoraFormatError(f"no file at {path}.")
    try:
        with open(path, "rb") as fh:
            head = fh.read(9)
    except OSError as exc:
        raise TLoraFormatError(f"{path} cannot be read ({exc}).") from exc
    # safetensors: 8-byte header length, then the JSON header; torch.save: a zip archive or a raw pickle
    if head[8:9] == b"{" or not (head.startswith(ZIP_MAGIC) or head.startswith(PICKLE_MAGIC)):
        return read_safetensors(path)
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a damaged pickle or zip raises many types (KeyError, struct.error...)
        raise TLoraFormatError(
            f"{path} could not be read as a torch file holding only tensors ({type(exc).__name__}). It is "
            f"corrupt, or it holds Python objects, which are never unpickled here.") from exc
    if not isinstance(obj, Mapping):
        raise TLoraFormatError(f"{path} holds a {type(obj).__name__}, not a dict of tensors.")
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise TLoraFormatError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor; "
                                   f"expected a flat state dict.")
        as_float32(value, key, str(path))  # refuses sparse, quantized and complex tensors
    return dict(obj), {}


def find_hparams(weights_path: str | os.PathLike) -> Optional[Path]:
    """The reference run's hparams.yml: beside the weights, or in `logs/` next to the checkpoint folder."""
    here = Path(weights_path).parent
    for candidate in (here / HPARAMS_NAME, here / "logs" / HPARAMS_NAME,
                      here.parent / "logs" / HPARAMS_NAME, here.parent / HPARAMS_NAME):
        if candidate.is_file():
            return candidate
    return None


def read_hparams(path: str | os.PathLike) -> dict:
    """Only the HPARAM_FIELDS of a reference hparams.yml. Nothing else is kept, logged or quoted in errors."""
    import yaml  # a ComfyUI dependency; imported here so the pure maths modules do not need it

    class _Loader(yaml.SafeLoader):
        """SafeLoader that turns tags it does not know (python/tuple, ...) into None instead of failing."""

    _Loader.add_multi_constructor("", lambda loader, suffix, node: None)
    path = Path(path)
    try:
        with open(path, "r", encoding="utf-8") as fh:
            data = yaml.load(fh, Loader=_Loader)  # noqa: S506 (SafeLoader subclass)
    except (yaml.YAMLError, ValueError, TypeError, OverflowError, RecursionError) as exc:
        # ValueError / TypeError / OverflowError: scalars YAML recognises but cannot build (e.g. a date 2024-13-45)
        mark = getattr(exc, "problem_mark", None)
        where = f" near line {mark.line + 1}" if mark is not None else ""
        raise TLoraFormatError(f"{path} is not valid YAML{where}; its text is not shown because the file "
                               f"may hold credentials. Pass min_rank and exponent yourself.") from None
    except OSError as exc:
        raise TLoraFormatError(f"{path} cannot be read ({type(exc).__name__}).") from None
    if not isinstance(data, dict):
        raise TLoraFormatError(f"{path} is not a mapping of settings.")
    return {k: data[k] for k in HPARAM_FIELDS if data.get(k) is not None}


# ---- schedule settings -----------------------------------------------------------------------------

@dataclass
class _Settings:
    """What a reader learned besides the tensors."""

    min_rank: Optional[int] = None
    exponent: float = 1.0
    masked: bool = True
    init: str = "last"
    trigger: str = ""
    class_word: str = ""
    hparams_rank: Optional[int] = None
    origin: str = "default"  # where the schedule came from, for the record
    path: str = ""  # the hparams file, for messages
    record: dict = field(default_factory=dict)


def _settings_from_hparams(hp: dict, hp_path: Path, flux: bool) -> _Settings:
    def number(name, kind):
        try:
            return kind(hp[name])
        except (TypeError, ValueError, OverflowError):
            raise TLoraFormatError(f"{hp_path}: field {name} is {hp[name]!r}, not a number.") from None

    s = _Settings(origin=HPARAMS_NAME, path=str(hp_path))
    if "min_rank" in hp:
        s.min_rank = number("min_rank", int)
    if "alpha_rank_scale" in hp and not flux:
        s.exponent = number("alpha_rank_scale", float)
    rank_field = "rank" if flux else "lora_rank"
    if rank_field in hp:
        s.hparams_rank = number(rank_field, int)
    if flux and "tlora" in hp:
        s.masked = bool(hp["tlora"])
    if not flux and hp.get("trainer_class") == "sdxl_lora":
        s.masked = False
    if hp.get("sig_type") in ORTHO_INITS:
        s.init = hp["sig_type"]
    s.trigger, s.class_word = str(hp.get("placeholder_token", "")), str(hp.get("class_name", ""))
    # plain JSON values only: the record goes into the file's metadata (YAML may give dates, lists, ...)
    s.record = {k: hp[k] if isinstance(hp[k], (str, int, float, bool)) else str(hp[k])
                for k in ("trainer_type", "trainer_class", "tlora", "sig_type") if k in hp}
    return s


def _reference_settings(path: Path, hparams, flux: bool) -> _Settings:
    hp_path = Path(hparams) if hparams is not None else find_hparams(path)
    if hp_path is not None and hp_path.is_dir():
        hp_path = hp_path / HPARAMS_NAME
    if hp_path is None:
        return _Settings()
    if not hp_path.is_file():
        raise TLoraFormatError(f"no {HPARAMS_NAME} at {hp_path}.")
    return _settings_from_hparams(read_hparams(hp_path), hp_path, flux)


def _make_config(rank: int, settings: _Settings, *, variant: str, base_model: str, source: str, origin: str,
                 min_rank: Optional[int], exponent: Optional[float]) -> TLoraConfig:
    """Explicit arguments first, then the file's settings, then the family's recipe (SD: r_min = rank // 2,
    the paper; FLUX: the reference FLUX code's proportion, 1 of 32). Every value guessed is logged."""
    if settings.hparams_rank is not None and settings.hparams_rank != rank:
        raise TLoraFormatError(
            f"{settings.path} says rank {settings.hparams_rank} but the tensors in {origin} have rank {rank}: "
            f"that {HPARAMS_NAME} belongs to another run. Pass hparams=<the right file> or min_rank yourself.")
    chosen_min = min_rank if min_rank is not None else settings.min_rank
    min_from = "argument" if min_rank is not None else settings.origin
    family = family_for(base_model)
    if chosen_min is None:
        chosen_min = family.recipe.resolve(rank=rank)["min_rank"] if family else max(1, rank // 2)
        min_from = f"default r_min = {chosen_min} ({family.name if family else 'the paper'}'s recipe for rank {rank})"
        logger.warning("%s: no %s and no r_min given: guessed r_min = %d (%s recipe). Set r_min on the node if the "
                       "run used another.", origin, HPARAMS_NAME, chosen_min, family.name if family else "paper")
    if exponent is None and settings.origin == "default":
        logger.warning("%s: no %s and no exponent given: guessed the paper's straight schedule (exponent 1).",
                       origin, HPARAMS_NAME)
    exp_from = "argument" if exponent is not None else settings.origin
    schedule_from = min_from if exp_from in (min_from, "default") else f"r_min: {min_from}; exponent: {exp_from}"
    training = {"imported_from": source, "schedule_from": schedule_from, **settings.record}
    try:
        return TLoraConfig(rank=rank, min_rank=chosen_min,
                           exponent=float(exponent if exponent is not None else settings.exponent),
                           variant=variant, init=settings.init, base_model=base_model,
                           family=family.name if family else "", trigger=settings.trigger,
                           class_word=settings.class_word, source=source, training=training)
    except TLoraConfigError as exc:
        raise TLoraFormatError(f"{origin} (schedule from {schedule_from}): {exc}") from exc


# ---- reference implementation ---------------------------------------------------------------------

def _vector(t: torch.Tensor, key: str, origin: str) -> torch.Tensor:
    if t.dim() == 2 and t.shape[0] == 1:
        return t[0]
    if t.dim() == 1:
        return t
    raise TLoraFormatError(f"{origin}: {key} has shape {tuple(t.shape)}, expected (1, r).")


def _factors(parts: dict[str, torch.Tensor], layer: str, origin: str, required=("down", "up")) -> LayerFactors:
    missing = [name for name in required if name not in parts]
    if missing:
        raise TLoraFormatError(f"{origin}: layer {layer!r} lacks its {', '.join(missing)} tensor(s).")
    return checked_factors(parts, f"{origin}: layer {layer!r}")


def _common_rank(layers: dict[str, LayerFactors], origin: str) -> int:
    if not layers:
        raise TLoraFormatError(f"{origin} holds no T-LoRA layers.")
    ranks = {key: f.rank for key, f in layers.items()}
    first = next(iter(ranks))
    for key, r in ranks.items():
        if r != ranks[first]:
            raise TLoraFormatError(f"{origin}: layer {key!r} has rank {r} but {first!r} has {ranks[first]}; "
                                   f"one rank mask cannot serve both.")
    return ranks[first]


def parse_reference(tensors: dict[str, torch.Tensor], origin: str, flux: bool) -> tuple[dict[str, LayerFactors], bool]:
    """Group reference processor tensors into LayerFactors by layer key; returns (layers, ortho)."""
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    kinds = set()
    dropped = 0
    for key, t in tensors.items():
        m = REFERENCE_KEY.match(key)
        if m is None:
            raise TLoraFormatError(f"{origin}: unexpected tensor {key!r} in a reference T-LoRA checkpoint.")
        proc, proj, param = m["proc"], m["proj"], m["param"]
        if flux and proc.startswith("single_transformer_blocks.") and proj in FLUX_SINGLE_UNUSED:
            dropped += 1
            continue
        if not flux and proj not in ("to_q", "to_k", "to_v", "to_out"):
            raise TLoraFormatError(f"{origin}: {key!r} adapts {proj}, which SD-XL attention does not have.")
        name = ORTHO_FIELDS.get(param) or VANILLA_FIELDS[param]
        kinds.add("ortho" if param in ORTHO_FIELDS else "vanilla")
        value = as_float32(t, key, origin)
        if name in ("scale", "base_scale"):
            value = _vector(value, key, origin)
        layer = f"transformer.{proc[:-len('.processor')]}.{FLUX_TARGETS[proj]}" if flux else f"{proc}.{proj}"
        grouped.setdefault(layer, {})[name] = value
    if len(kinds) > 1:
        raise TLoraFormatError(f"{origin} mixes ortho (q_layer/p_layer) and vanilla (down/up) adapters.")
    ortho = kinds == {"ortho"}
    required = ("down", "up", "scale", "base_down", "base_up", "base_scale") if ortho else ("down", "up")
    layers = {layer: _factors(parts, layer, origin, required) for layer, parts in grouped.items()}
    if dropped:
        logger.info("%s: dropped %d adapters of single-stream blocks that the reference FLUX processor never "
                    "calls (to_out, add_*_proj)", origin, dropped)
    return layers, ortho


# width of the text-encoder states that cross-attention keys read -> the UNet family (config class)
UNET_CONTEXT_WIDTH = {768: "SD15", 1024: "SD20", 2048: "SDXL"}


def unet_base_model(layers: dict[str, LayerFactors], origin: str) -> str:
    """SD 1.x, 2.x or SD-XL, from the width of a cross-attention key projection (the text encoder's
    width: 768, 1024, 2048), since reference-layout files for every UNet share their key names."""
    for key, f in layers.items():
        if ".attn2." in key and key.endswith("to_k"):
            base = UNET_CONTEXT_WIDTH.get(f.in_features)
            if base is not None:
                return base
    logger.warning("%s: no cross-attention key projection of a known width (768, 1024, 2048): assumed SD-XL, the "
                   "reference code's model.", origin)
    return "SDXL"


def read_reference_sdxl(path: str | os.PathLike, *, min_rank: Optional[int] = None,
                        exponent: Optional[float] = None, hparams: Optional[str | os.PathLike] = None,
                        base_model: Optional[str] = None, tensors: Optional[dict] = None) -> TLora:
    """Reference-layout UNet `pytorch_lora_weights.safetensors` (SD-XL, or SD 1.x / 2.x by the width of the
    cross-attention keys unless base_model is given; ortho -> variant tlora, vanilla -> vanilla_tlora; a
    run of their plain `sdxl_lora` trainer class -> ortho_lora / lora, full rank at every t)."""
    path = Path(path)
    tensors = load_state_dict(path)[0] if tensors is None else tensors
    layers, ortho = parse_reference(tensors, str(path), flux=False)
    base_model = base_model or unet_base_model(layers, str(path))
    settings = _reference_settings(path, hparams, flux=False)
    variant = ("tlora" if ortho else "vanilla_tlora") if settings.masked else ("ortho_lora" if ortho else "lora")
    config = _make_config(_common_rank(layers, str(path)), settings, variant=variant, base_model=base_model,
                          source=FORMAT_REFERENCE_SDXL, origin=str(path), min_rank=min_rank, exponent=exponent)
    _log_read(path, FORMAT_REFERENCE_SDXL, config, len(layers))
    return TLora(config, layers)


def read_reference_flux(path: str | os.PathLike, *, min_rank: Optional[int] = None,
                        exponent: Optional[float] = None, hparams: Optional[str | os.PathLike] = None,
                        tensors: Optional[dict] = None) -> TLora:
    """Reference FLUX `lora.pt` (vanilla; variant vanilla_tlora, or lora when hparams says tlora: false)."""
    path = Path(path)
    tensors = load_state_dict(path)[0] if tensors is None else tensors
    layers, ortho = parse_reference(tensors, str(path), flux=True)
    if ortho:
        raise TLoraFormatError(f"{path}: the reference FLUX code trains vanilla adapters only, but this file "
                               f"holds q_layer/p_layer tensors.")
    settings = _reference_settings(path, hparams, flux=True)
    config = _make_config(_common_rank(layers, str(path)), settings,
                          variant="vanilla_tlora" if settings.masked else "lora", base_model="Flux",
                          source=FORMAT_REFERENCE_FLUX, origin=str(path), min_rank=min_rank, exponent=exponent)
    _log_read(path, FORMAT_REFERENCE_FLUX, config, len(layers))
    return TLora(config, layers)


# ---- LyCORIS --------------------------------------------------------------------------------------

def lycoris_base_factors(weight: torch.Tensor, rank: int, sig_type: str = "principal"):
    """(Q0, P0, λ0) as LyCORIS builds them on load: SVD of W (float64 here), a slice of r triplets,
    zero-padded (λ0 = 1e-6) when r exceeds min(out, in). Conv weights are flattened to [out, in·k·k]."""
    w = weight.detach().to("cpu", torch.float64).reshape(weight.shape[0], -1)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    if sig_type == "principal":
        q0, p0, lam0 = vh[:rank], u[:, :rank], s[:rank]
    elif sig_type == "last":
        q0, p0, lam0 = vh[-rank:], u[:, -rank:], s[-rank:]
    elif sig_type == "middle":
        start = (s.shape[0] - rank) // 2  # LyCORIS' own slice, negative start included
        q0, p0, lam0 = vh[start:start + rank], u[:, start:start + rank], s[start:start + rank]
    else:
        raise TLoraConfigError(f"unknown sig_type {sig_type!r}; choose principal, last or middle.")
    pad = rank - q0.shape[0]
    if pad > 0:
        q0 = torch.cat([q0, q0.new_zeros(pad, q0.shape[1])])
        p0 = torch.cat([p0, p0.new_zeros(p0.shape[0], pad)], dim=1)
        lam0 = torch.cat([lam0, lam0.new_full((pad,), 1e-6)])
    return q0.float(), p0.float(), lam0.float()


def _flat_matrix(t: torch.Tensor, key: str, origin: str) -> torch.Tensor:
    if t.dim() == 2:
        return t
    if t.dim() > 2 and all(d == 1 for d in t.shape[2:]):
        return t.reshape(t.shape[0], t.shape[1])
    raise TLoraFormatError(f"{origin}: {key} has shape {tuple(t.shape)}; only Linear and 1x1 conv layers "
                           f"are supported.")


def _group_lycoris(tensors: dict[str, torch.Tensor], origin: str) -> dict[str, dict[str, torch.Tensor]]:
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        for suffix, name in LYCORIS_FIELDS.items():
            if key.endswith("." + suffix):
                layer = key[: -len(suffix) - 1]
                value = as_float32(t, key, origin)
                if name in ("down", "up", "base_down", "base_up"):
                    value = _flat_matrix(value, key, origin)
                elif name in ("scale", "base_scale"):
                    value = _vector(value, key, origin)
                grouped.setdefault(layer, {})[name] = value
                break
        else:
            raise TLoraFormatError(f"{origin}: tensor {key!r} is not part of a LyCORIS T-LoRA layer (another "
                                   f"LyCORIS algorithm?); this pack reads files whose layers are all algo=tlora.")
    return grouped


def _base_weight_for(base_weights: BaseWeights, layer: str) -> Optional[torch.Tensor]:
    if callable(base_weights):
        return base_weights(layer)
    return base_weights.get(layer)


def _rebuild_lycoris_bases(grouped, base_weights, sig_type, origin):
    need = [layer for layer, parts in grouped.items() if "base_down" not in parts]
    if need and base_weights is None:
        raise MissingBaseWeightsError(
            f"{origin} is a LyCORIS T-LoRA: it stores q, p, lambda and alpha but not the frozen initial factors, "
            f"which LyCORIS rebuilds from the SVD of the base model's weights ({len(need)} layers, e.g. "
            f"{need[0]!r}). It cannot be used without that model: load it through this pack's T-LoRA loader "
            f"node together with the model it was trained on (it passes the model's weights), or call "
            f"read_lycoris(..., base_weights=...).", need)
    for layer in need:
        parts = grouped[layer]
        weight = _base_weight_for(base_weights, layer)
        if weight is None:
            raise MissingBaseWeightsError(f"{origin}: no base weight given for layer {layer!r}, needed to rebuild "
                                          f"its frozen LyCORIS factors; is this the model it was trained on?",
                                          [layer])
        out_f, in_f = parts["up"].shape[0], parts["down"].shape[1]
        if weight.shape[0] != out_f or weight[0].numel() != in_f:
            raise TLoraFormatError(f"{origin}: layer {layer!r} has factors for a [{out_f}, {in_f}] weight but the "
                                   f"model's weight is {tuple(weight.shape)}; wrong model, or a conv with a "
                                   f"kernel larger than 1x1 (not supported).")
        q0, p0, lam0 = lycoris_base_factors(weight, parts["down"].shape[0], sig_type)
        parts.update(base_down=q0, base_up=p0, base_scale=lam0)


def parse_lycoris(tensors: dict[str, torch.Tensor], origin: str, *, base_weights: Optional[BaseWeights] = None,
                  sig_type: str = "principal") -> dict[str, LayerFactors]:
    """LayerFactors of a LyCORIS algo=tlora state dict, alpha/r folded into the scales."""
    grouped = _group_lycoris(tensors, origin)
    for layer, parts in grouped.items():
        missing = [name for name in ("down", "up", "scale") if name not in parts]
        if missing:
            raise TLoraFormatError(f"{origin}: layer {layer!r} lacks its {', '.join(missing)} tensor(s) "
                                   f"(q_layer, p_layer, lambda_layer).")
        if parts["down"].shape[0] == 0 or parts["down"].shape[0] != parts["up"].shape[1]:
            raise TLoraFormatError(f"{origin}: layer {layer!r}: q_layer {tuple(parts['down'].shape)} and p_layer "
                                   f"{tuple(parts['up'].shape)} do not share a rank >= 1; the file is corrupt.")
        alpha = parts.get("alpha")
        if alpha is not None and (alpha.numel() != 1 or not bool(torch.isfinite(alpha).all())):
            raise TLoraFormatError(f"{origin}: layer {layer!r}: alpha must be one finite number, got shape "
                                   f"{tuple(alpha.shape)}; the file is corrupt.")
    _rebuild_lycoris_bases(grouped, base_weights, sig_type, origin)
    layers = {}
    for layer, parts in grouped.items():
        rank = parts["down"].shape[0]
        alpha = float(parts.pop("alpha").reshape(-1)[0]) if "alpha" in parts else 0.0
        gain = (alpha if alpha != 0 else rank) / rank  # LyCORIS: alpha 0 or absent means alpha = rank
        parts["scale"] = parts["scale"] * gain
        if "base_scale" in parts:
            parts["base_scale"] = parts["base_scale"] * gain
        layers[layer] = _factors(parts, layer, origin,
                                 ("down", "up", "scale", "base_down", "base_up", "base_scale"))
    return layers


def read_lycoris(path: str | os.PathLike, *, min_rank: Optional[int] = None, exponent: Optional[float] = None,
                 base_weights: Optional[BaseWeights] = None, sig_type: str = "principal",
                 base_model: str = "", tensors: Optional[dict] = None) -> TLora:
    """A LyCORIS algo=tlora file. `base_weights` maps layer keys to the pretrained W (or is a callable
    layer_key -> W); without it MissingBaseWeightsError says what cannot be rebuilt. `sig_type` must be
    the slice LyCORIS rebuilt with on load ('principal' unless the network was created with another)."""
    path = Path(path)
    tensors = load_state_dict(path)[0] if tensors is None else tensors
    layers = parse_lycoris(tensors, str(path), base_weights=base_weights, sig_type=sig_type)
    settings = _Settings(init=sig_type, record={"sig_type": sig_type})
    config = _make_config(_common_rank(layers, str(path)), settings, variant="tlora", base_model=base_model,
                          source=FORMAT_LYCORIS, origin=str(path), min_rank=min_rank, exponent=exponent)
    _log_read(path, FORMAT_LYCORIS, config, len(layers))
    return TLora(config, layers)


# ---- sniffing ----------------------------------------------------------------------------------------

def sniff_format(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> tuple[str, str]:
    """(format, evidence key) of a state dict: one of the FORMAT_* names and the key that decided it."""
    if is_tlora_metadata(dict(metadata)):
        return FORMAT_PACK, "tlora.format"
    keys = list(tensors)
    for key in keys:
        if REFERENCE_KEY.match(key):
            flux = key.startswith(("transformer_blocks.", "single_transformer_blocks."))
            return (FORMAT_REFERENCE_FLUX if flux else FORMAT_REFERENCE_SDXL), key
    for key in keys:
        if key.endswith(".lambda_layer") and key[: -len("lambda_layer")] + "q_layer.weight" in tensors:
            return FORMAT_LYCORIS, key
    for key in keys:
        if key.endswith(STANDARD_LORA_SUFFIXES) or key.endswith("_lora.down.weight"):
            return FORMAT_STANDARD_LORA, key
    return FORMAT_UNKNOWN, keys[0] if keys else ""


def read_any(path: str | os.PathLike, *, min_rank: Optional[int] = None, exponent: Optional[float] = None,
             hparams: Optional[str | os.PathLike] = None, base_weights: Optional[BaseWeights] = None,
             sig_type: str = "principal", base_model: Optional[str] = None) -> TLora:
    """Read any T-LoRA file this pack knows; explicit min_rank / exponent override the file's settings."""
    path = Path(path)
    tensors, metadata = load_state_dict(path)
    kind, evidence = sniff_format(tensors, metadata)
    if kind == FORMAT_PACK:
        tlora = parse_tlora(tensors, metadata, str(path))
        tlora.origin = path
        changes = {k: v for k, v in (("min_rank", min_rank), ("exponent", exponent)) if v is not None}
        if changes:
            try:
                tlora.config = tlora.config.replace(**changes)
            except TLoraConfigError as exc:
                raise TLoraFormatError(f"{path}: {exc}") from exc
        return tlora
    if kind == FORMAT_REFERENCE_SDXL:
        return read_reference_sdxl(path, min_rank=min_rank, exponent=exponent, hparams=hparams,
                                   base_model=base_model, tensors=tensors)
    if kind == FORMAT_REFERENCE_FLUX:
        return read_reference_flux(path, min_rank=min_rank, exponent=exponent, hparams=hparams, tensors=tensors)
    if kind == FORMAT_LYCORIS:
        return read_lycoris(path, min_rank=min_rank, exponent=exponent, base_weights=base_weights,
                            sig_type=sig_type, base_model=base_model or "", tensors=tensors)
    if "tlora.format" in metadata:
        raise TLoraFormatError(
            f"{path} says tlora.format = {metadata['tlora.format']!r}; this version of the pack reads "
            f"{FORMAT_NAME!r} only. Update the pack.")
    if "tlora.export_format" in metadata:
        raise TLoraFormatError(
            f"{path} is an ordinary LoRA exported from a T-LoRA ('Export T-LoRA as LoRA': one rank mask frozen, "
            f"no schedule). Load it with ComfyUI's LoraLoader (Load LoRA), or load the original T-LoRA file here.")
    if kind == FORMAT_STANDARD_LORA:
        raise TLoraFormatError(
            f"{path} is an ordinary LoRA (key {evidence!r}), not a T-LoRA: it has no rank schedule. Load it with "
            f"ComfyUI's LoraLoader (Load LoRA) instead. (Conversion goes the other way only: 'Export T-LoRA as "
            f"LoRA' turns a T-LoRA into such a file.)")
    if any(KEY_MARK in key for key in tensors):
        raise TLoraFormatError(
            f"{path} has this pack's tensor names ({evidence!r}) but no tlora.format metadata: it was re-saved by a "
            f"tool that drops metadata, and its rank and schedule are lost. Use the file the trainer wrote.")
    raise TLoraFormatError(
        f"{path} is not a T-LoRA file this pack knows (first key {evidence!r}). Known: this pack's files, "
        f"ControlGenAI/T-LoRA checkpoints (pytorch_lora_weights.safetensors, lora.pt) and LyCORIS algo=tlora.")


def _log_read(path: Path, kind: str, config: TLoraConfig, n_layers: int):
    logger.info("read %s %s: %d layers, %s rank %d, r_min %d, exponent %g (%s)", kind, path.name, n_layers,
                config.variant, config.rank, config.min_rank, config.exponent, config.training.get("schedule_from"))

"""The pack's T-LoRA file: one .safetensors with self-describing metadata.

Tensors: `<layer>.tlora_<field>` for field in down, up, scale, base_down, base_up, base_scale, where
<layer> is a LoRA layer key that ComfyUI's LoRA key maps resolve (this pack's trainer writes
`diffusion_model.<module path>`; converted files keep their source's diffusers or kohya names).
The names differ from `lora_down/lora_up` on purpose: a stock LoRA loader must not silently apply a
T-LoRA without its mask and base subtraction.

Metadata (all strings): tlora.format = "comfyui-tlora", tlora.format_version, tlora.config (JSON of
TLoraConfig: rank, min_rank, exponent, T, variant, init, base model, trigger, training settings).
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .adapter import TENSOR_FIELDS, LayerFactors, delta_weight
from .config import TLoraConfig
from .errors import TLoraConfigError, TLoraError, TLoraFormatError, TLoraSaveError

FORMAT_NAME = "comfyui-tlora"
FORMAT_VERSION = 1
KEY_MARK = ".tlora_"
STORAGE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
MATRIX_FIELDS = ("down", "up", "base_down", "base_up")  # [r, in] / [out, r]; the other fields are (r,)


@dataclass
class TLora:
    """A T-LoRA in memory: its settings and the factors of every adapted layer, by layer key."""

    config: TLoraConfig
    layers: dict[str, LayerFactors] = field(default_factory=dict)
    origin: Optional[Path] = None  # the file it was read from (the trainer looks for its resume state there)

    def num_values(self) -> int:
        return sum(t.numel() for f in self.layers.values() for t in f.tensors().values())

    def delta_weights(self, mask: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
        """Dense dW for every layer at one mask (None = full rank), float32 on the CPU."""
        return {key: delta_weight(f, mask) for key, f in self.layers.items()}


def stores_residuals(dtype) -> bool:
    """Half-precision files store trained factors as residuals from the frozen ones (see to_state_dict)."""
    return dtype != torch.float32


def to_state_dict(tlora: TLora, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """Flat tensor dict in the file's key layout, contiguous, on the CPU, in the storage dtype.

    dW is the difference of two nearly equal products (Eq. 6), so rounding the trained and frozen
    factors independently to 16 bits would cost percent-level error early in training. In 16-bit
    files a trained factor is stored as its residual (factor - frozen factor) and rebuilt on load as
    rounded frozen + rounded residual: the rounding of the frozen factor then appears identically in
    both products, dW keeps 16-bit accuracy relative to itself, and it is exactly zero at init.
    """
    out = {}
    for layer, f in tlora.layers.items():
        tensors = {name: t.detach().to("cpu", torch.float32) for name, t in f.tensors().items()}
        for name, t in tensors.items():
            base = tensors.get(f"base_{name}")
            if stores_residuals(dtype) and base is not None:
                t = t - base
            out[f"{layer}{KEY_MARK}{name}"] = t.to(dtype).contiguous()
    return out


def from_state_dict(tensors: dict[str, torch.Tensor], config: TLoraConfig, origin: str = "",
                    residuals: bool = False) -> TLora:
    """Group `<layer>.tlora_<field>` tensors back into LayerFactors (float32); undo residual storage."""
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        layer, mark, name = key.rpartition(KEY_MARK)
        if not mark or name not in TENSOR_FIELDS:
            raise TLoraFormatError(f"unexpected tensor {key!r} in T-LoRA file {origin or '?'}.")
        grouped.setdefault(layer, {})[name] = as_float32(t, key, origin or "?")
    if residuals:
        for layer, parts in grouped.items():
            for name in list(parts):
                base = parts.get(f"base_{name}")
                if base is None:
                    continue
                if base.shape != parts[name].shape:  # checked before the sum, which would fail without names
                    raise TLoraFormatError(
                        f"layer {layer!r} in {origin or '?'}: {name} has shape {tuple(parts[name].shape)} but "
                        f"base_{name} has {tuple(base.shape)}; in a 16-bit file {name} is stored as a residual "
                        f"from base_{name}, so both must match. The file is corrupt or was edited: use the file "
                        f"the trainer wrote, or an earlier checkpoint.")
                parts[name] = base + parts[name]
    layers = {}
    for layer, parts in grouped.items():
        if "down" not in parts or "up" not in parts:
            raise TLoraFormatError(f"layer {layer!r} in {origin or '?'} lacks its down or up tensor.")
        layers[layer] = checked_factors(parts, f"layer {layer!r} in {origin or '?'}")
        if layers[layer].rank != config.rank:
            raise TLoraFormatError(f"layer {layer!r} in {origin or '?'} has rank {layers[layer].rank}, "
                                   f"the metadata says {config.rank}.")
    return TLora(config=config, layers=layers)


def as_float32(t: torch.Tensor, key: str, origin: str) -> torch.Tensor:
    """A file's tensor as a dense float32 tensor; complex, quantized or sparse ones are refused."""
    if t.layout != torch.strided or t.is_quantized or t.is_complex():
        raise TLoraFormatError(f"{origin}: tensor {key!r} is {t.dtype} / {t.layout}, not a dense real tensor; "
                               f"the file is corrupt or not a T-LoRA.")
    return t.to(torch.float32)


def checked_factors(parts: dict[str, torch.Tensor], where: str) -> LayerFactors:
    """LayerFactors of one layer read from a file, refusing what a corrupt file holds: tensors with the wrong
    number of dimensions, empty ones, NaN or infinite values. `where` names the layer and the file."""
    for name, t in parts.items():
        dims = 2 if name in MATRIX_FIELDS else 1
        if t.dim() != dims or t.numel() == 0:
            raise TLoraFormatError(f"{where}: {name} has shape {tuple(t.shape)}, expected a non-empty {dims}-D "
                                   f"tensor; the file is corrupt or not a T-LoRA.")
        if not bool(torch.isfinite(t).all()):
            raise TLoraFormatError(f"{where}: {name} holds NaN or infinite values; the file is corrupt or was "
                                   f"saved from a diverged training run. Use an earlier checkpoint.")
    try:
        return LayerFactors(**parts)
    except TLoraFormatError as exc:
        raise TLoraFormatError(f"{where}: {exc}") from exc


def metadata_for(tlora: TLora, storage: str) -> dict[str, str]:
    return {"tlora.format": FORMAT_NAME, "tlora.format_version": str(FORMAT_VERSION),
            "tlora.config": tlora.config.to_json(), "tlora.storage": storage,
            "tlora.residuals": "1" if stores_residuals(STORAGE_DTYPES[storage]) else "0", "format": "pt"}


def write_new_file(path: str | os.PathLike, write) -> Path:
    """Run write(tmp_path) then move the result to `path` atomically, never replacing an existing file.

    The temporary file sits in the target folder, so a crash, a cancel or a full disk leaves no partial
    file under the final name, and whatever was at `path` before stays as it was.
    """
    path = Path(path)
    if path.exists():
        raise _exists_error(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
        os.close(fd)
    except OSError as exc:
        raise _save_error(path, exc) from exc
    try:
        try:
            write(tmp)
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            # mkstemp (and safetensors) create 0600 files; give the usual umask-based mode instead,
            # so a ComfyUI running as another user or a shared models folder can read the result.
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
        except (OSError, SafetensorError) as exc:
            raise _save_error(path, exc) from exc
        try:
            os.link(tmp, path)  # fails if path appeared meanwhile: no overwrite, even in a race
        except FileExistsError:
            raise _exists_error(path)
        except OSError:
            if path.exists():
                raise _exists_error(path)
            os.replace(tmp, path)  # file systems without hard links
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _exists_error(path: Path) -> TLoraError:
    return TLoraError(f"{path} already exists; it is never overwritten. Choose another file name.")


def _save_error(path: Path, exc: BaseException) -> TLoraSaveError:
    """Why writing `path` failed, and what is left: nothing under that name, earlier files untouched."""
    err = TLoraSaveError(f"could not write {path} ({exc}). Nothing was written under that name and earlier files "
                         f"are untouched. Free disk space or choose a folder you may write to, then run again.")
    err.errno = getattr(exc, "errno", None)
    return err


def save_tlora(tlora: TLora, path: str | os.PathLike, storage: str = "fp32") -> Path:
    """Write `tlora` to a new .safetensors file (fp32, fp16 or bf16 storage); returns the path."""
    if storage not in STORAGE_DTYPES:
        raise TLoraError(f"unknown storage dtype {storage!r}; choose one of {', '.join(STORAGE_DTYPES)}.")
    tensors = to_state_dict(tlora, STORAGE_DTYPES[storage])
    metadata = metadata_for(tlora, storage)
    return write_new_file(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a .safetensors file, with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise TLoraFormatError(f"no file at {path}.")
    try:
        from safetensors import safe_open
        with safe_open(str(path), framework="pt") as fh:
            metadata = fh.metadata() or {}
        tensors = load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - safetensors also raises OverflowError, TypeError, ... on bad headers
        raise TLoraFormatError(
            f"{path} is not a readable .safetensors file ({exc}). It may be truncated or of another "
            f"format; download or export it again.") from exc
    return tensors, metadata


def is_tlora_metadata(metadata: dict[str, str]) -> bool:
    return metadata.get("tlora.format") == FORMAT_NAME


def parse_tlora(tensors: dict[str, torch.Tensor], metadata: dict[str, str], origin: str = "") -> TLora:
    """Build a TLora from an already-read file of this pack's format."""
    if not is_tlora_metadata(metadata):
        raise TLoraFormatError(f"{origin or 'the file'} is not a {FORMAT_NAME} file (its metadata has no "
                               f"tlora.format = {FORMAT_NAME}).")
    try:
        version = int(metadata.get("tlora.format_version", ""))
    except ValueError:
        raise TLoraFormatError(f"{origin}: format version {metadata.get('tlora.format_version')!r} is not a number.")
    if version > FORMAT_VERSION:
        raise TLoraFormatError(f"{origin} uses T-LoRA format version {version}; this pack reads up to "
                               f"{FORMAT_VERSION}. Update the pack.")
    if not tensors:
        raise TLoraFormatError(f"{origin} is a T-LoRA file without any layers (no tensors); the file is damaged "
                               f"or was cut short. Use the original file.")
    if "tlora.config" not in metadata:
        raise TLoraFormatError(f"{origin}: its metadata has no tlora.config (the T-LoRA's settings); the file was "
                               f"damaged or re-saved by a tool that drops metadata. Use the original file.")
    try:
        config = TLoraConfig.from_json(metadata["tlora.config"])
    except TLoraConfigError as exc:
        raise TLoraFormatError(f"{origin}: {exc}") from exc
    except (TypeError, ValueError, RecursionError) as exc:  # e.g. a list where a name belongs
        raise TLoraFormatError(f"{origin}: its tlora.config metadata is malformed ({type(exc).__name__}: {exc}); "
                               f"the file is corrupt.") from exc
    return from_state_dict(tensors, config, origin, residuals=metadata.get("tlora.residuals") == "1")


def load_tlora(path: str | os.PathLike) -> TLora:
    """Read a file written by save_tlora."""
    tensors, metadata = read_safetensors(path)
    tlora = parse_tlora(tensors, metadata, str(path))
    tlora.origin = Path(path)
    return tlora

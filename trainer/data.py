"""Turns ComfyUI IMAGE / MASK tensors into training pixels: the paper's centred square (SD-XL's reference), or
the short side resized for the random square each step of the reference FLUX recipe (trainer.loop)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..tlora_core.errors import TLoraError

MAX_RESOLUTION = 2048


def to_rgb(image: torch.Tensor) -> torch.Tensor:
    """[N, H, W, C] in 0..1 with C = 1 (grayscale), 3 or 4 (alpha dropped) -> [N, H, W, 3]."""
    if image.dim() == 3:
        image = image.unsqueeze(0)
    if image.dim() != 4:
        raise TLoraError(f"IMAGE must be [batch, height, width, channels], got shape {list(image.shape)}.")
    channels = image.shape[-1]
    if channels == 1:
        return image.expand(-1, -1, -1, 3)
    if channels in (3, 4):
        return image[..., :3]
    raise TLoraError(f"IMAGE has {channels} channels; expected 1 (gray), 3 (RGB) or 4 (RGBA).")


def pick_resolution(requested: int, native: int) -> int:
    """requested > 0 wins; else the model's native size, as the paper trains SD-XL at 1024 whatever the
    photo's size (a smaller photo is upscaled); a multiple of 64."""
    side = requested if requested > 0 else native
    return max(64, side // 64 * 64)


def centre_crop_resize(pixels: torch.Tensor, size: int) -> torch.Tensor:
    """[N, H, W, C] -> [N, size, size, C]: the largest centred square, resized (antialiased)."""
    _, h, w, _ = pixels.shape
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    return _resize(pixels[:, top:top + side, left:left + side, :], size, size)


def short_side_resize(pixels: torch.Tensor, size: int) -> torch.Tensor:
    """[N, H, W, C] -> the whole image with its short side `size` and the long side in proportion, rounded to
    a multiple of 64 px (so that a VAE of 8, 16 or 32 px per latent cell encodes all of it)."""
    _, h, w, _ = pixels.shape
    long = max(size, round(max(h, w) * size / min(h, w) / 64) * 64)
    return _resize(pixels, size, long) if h <= w else _resize(pixels, long, size)


def _resize(pixels: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[N, H, W, C] resized (bicubic, antialiased) to [N, height, width, C] in 0..1."""
    if tuple(pixels.shape[1:3]) == (height, width):
        return pixels.clamp(0, 1)
    moved = F.interpolate(pixels.movedim(-1, 1), size=(height, width), mode="bicubic", antialias=True,
                          align_corners=False)
    return moved.clamp(0, 1).movedim(1, -1)


def source_side(image: torch.Tensor) -> int:
    """The side of the largest square in the source image (SD-XL's "original size" in the reference)."""
    return min(image.shape[-3], image.shape[-2])


def prepare_images(image: torch.Tensor, mask: Optional[torch.Tensor], resolution: int, native: int,
                   crop: str = "centre"):
    """Training pixels and loss weights (None without a mask): [N, S, S, 3] / [N, S, S] for crop "centre";
    for "random" the whole image with short side S (the loop cuts a random square each step)."""
    if image.numel() == 0 or image.shape[-2] == 0 or image.shape[-3] == 0:
        raise TLoraError("the IMAGE is empty (size 0); connect a real image.")
    if not bool(torch.isfinite(image).all()):
        raise TLoraError("the IMAGE holds NaN or infinite values; the node that made it produced invalid pixels. "
                         "Connect the image straight from LoadImage, or fix the node before this one.")
    rgb = to_rgb(image.float())
    h, w = rgb.shape[1:3]
    if max(h, w) > 4 * MAX_RESOLUTION:
        raise TLoraError(f"the IMAGE is {w}x{h}; images over {4 * MAX_RESOLUTION} px per side are refused. "
                         f"Downscale it first (e.g. with ImageScale).")
    size = pick_resolution(resolution, native)
    if size > MAX_RESOLUTION:
        raise TLoraError(f"resolution {size} is larger than {MAX_RESOLUTION}; choose a smaller resolution.")
    fit = centre_crop_resize if crop == "centre" else short_side_resize
    pixels = fit(rgb, size)
    if mask is None:
        return pixels, None
    if mask.dim() == 2:
        mask = mask.unsqueeze(0)
    if mask.dim() == 4 and mask.shape[-1] == 1:  # [N, H, W, 1], as some nodes hand it on
        mask = mask[..., 0]
    if mask.dim() != 3:
        raise TLoraError(f"MASK must be [height, width] or [batch, height, width], got shape {list(mask.shape)}.")
    if tuple(mask.shape[1:]) != (h, w):
        raise TLoraError(f"the MASK is {mask.shape[2]}x{mask.shape[1]} but the IMAGE is {w}x{h}; "
                         f"use a mask made for this image (e.g. from the same LoadImage).")
    if mask.shape[0] not in (1, rgb.shape[0]):
        raise TLoraError(f"{mask.shape[0]} masks for {rgb.shape[0]} images; give one mask or one per image.")
    if not bool(torch.isfinite(mask).all()):
        raise TLoraError("the MASK holds NaN or infinite values; the node that made it produced an invalid mask. "
                         "Use a mask with values from 0 (ignore) to 1 (subject), or disconnect it.")
    weights = fit(mask.float().unsqueeze(-1), size)[..., 0]
    check_mask_covers_something(mask, weights)
    return pixels, weights.expand(rgb.shape[0], -1, -1)


def check_mask_covers_something(mask: torch.Tensor, weights: torch.Tensor):
    """Refuse a mask that gives every training pixel weight 0: the loss would be 0 and nothing trained."""
    for i in range(weights.shape[0]):
        which = f"mask {i + 1} of {weights.shape[0]}" if weights.shape[0] > 1 else "the MASK"
        if not bool((mask[i] > 0).any()):
            raise TLoraError(f"{which} is all zero (black), so no pixel would be trained and the T-LoRA would learn "
                             f"nothing. Paint the subject white (1) in the mask, or disconnect the mask to train on "
                             f"the whole image.")
        if not bool((weights[i] > 0).any()):
            raise TLoraError(f"{which} covers nothing inside the centred square crop that training uses, so the "
                             f"T-LoRA would learn nothing. Crop the image around the subject first, or disconnect "
                             f"the mask.")

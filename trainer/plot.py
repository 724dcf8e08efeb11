"""A small loss-curve picture as a ComfyUI IMAGE, drawn with Pillow (no plotting library needed)."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing mean over `window` points, so single-sample noise does not hide the trend."""
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def loss_curve_image(losses: list[float], width: int = 512, height: int = 256) -> torch.Tensor:
    """[1, height, width, 3] float image: raw loss in grey, smoothed loss in blue, min/max labelled."""
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    pad = 30
    draw.rectangle([pad, pad // 2, width - pad // 2, height - pad], outline=(160, 160, 160))
    if losses:
        lo, hi = min(losses), max(losses)
        span = (hi - lo) or 1.0

        def point(i, v):
            x = pad + (width - 1.5 * pad) * (i / max(len(losses) - 1, 1))
            y = (height - pad) - (height - 1.5 * pad) * ((v - lo) / span)
            return x, y

        for series, colour in ((losses, (190, 190, 190)), (smooth(losses, max(len(losses) // 20, 1)), (30, 90, 200))):
            if len(series) > 1:
                draw.line([point(i, v) for i, v in enumerate(series)], fill=colour, width=2)
        draw.text((2, 2), f"max {hi:.4g}", fill=(0, 0, 0))
        draw.text((2, height - pad + 4), f"min {lo:.4g}   steps {len(losses)}", fill=(0, 0, 0))
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).unsqueeze(0)

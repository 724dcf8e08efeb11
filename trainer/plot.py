"""Small pictures as ComfyUI IMAGEs (the loss curve, the IS / TS trade-off), drawn with Pillow (no plotting
library needed)."""
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


def tradeoff_image(points: list[tuple[float, float]], labels: list[str], front: list[int], best: int,
                   width: int = 768, height: int = 512) -> torch.Tensor:
    """[1, height, width, 3] float image of the paper's figure: IS (y) against TS (x), one numbered dot per
    candidate, the Pareto front joined in blue, the chosen candidate ringed in red; a key on the right
    names each number."""
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    key_w = min(300, width // 3)
    left, top, right, bottom = 50, 20, width - key_w - 20, height - 40
    draw.rectangle([left, top, right, bottom], outline=(160, 160, 160))
    ts, is_ = [p[1] for p in points], [p[0] for p in points]

    def axis(values):
        lo, hi = min(values), max(values)
        pad = (hi - lo) * 0.1 or 0.01
        return lo - pad, hi + pad

    (x0, x1), (y0, y1) = axis(ts), axis(is_)

    def at(p):
        return (left + (right - left) * (p[1] - x0) / (x1 - x0), bottom - (bottom - top) * (p[0] - y0) / (y1 - y0))

    line = sorted((at(points[i]) for i in front), key=lambda xy: xy[0])
    if len(line) > 1:
        draw.line(line, fill=(30, 90, 200), width=2)
    for i, p in enumerate(points):
        x, y = at(p)
        colour = (30, 90, 200) if i in front else (150, 150, 150)
        draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=colour)
        if i == best:
            draw.ellipse([x - 9, y - 9, x + 9, y + 9], outline=(210, 40, 40), width=2)
        draw.text((x + 7, y - 14), str(i + 1), fill=(0, 0, 0))
    draw.text((left, bottom + 6), f"TS {x0:.4f}", fill=(0, 0, 0))
    draw.text((right - 70, bottom + 6), f"{x1:.4f}", fill=(0, 0, 0))
    draw.text((4, top), f"IS\n{y1:.4f}", fill=(0, 0, 0))
    draw.text((4, bottom - 12), f"{y0:.4f}", fill=(0, 0, 0))
    draw.text((left + 4, bottom + 22), "blue: Pareto front   red ring: chosen", fill=(80, 80, 80))
    room = key_w // 6  # characters of the default font that fit the key
    for i, (label, p) in enumerate(zip(labels, points)):
        y = top + 30 * i
        if y > height - 30:
            break
        colour = (210, 40, 40) if i == best else (0, 0, 0)
        draw.text((width - key_w, y), f"{i + 1}: IS {p[0]:.4f}  TS {p[1]:.4f}", fill=colour)
        # a long label keeps its end: the file's number, r_min and strength
        draw.text((width - key_w + 10, y + 13), label if len(label) <= room else "..." + label[3 - room:], fill=colour)
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).unsqueeze(0)

"""Charts as ComfyUI IMAGEs, drawn with Pillow (ComfyUI ships no plotting library).

The loss chart the Train node returns: steps on x, loss on y, both with ticks; the raw loss faint, its EMA
bold, and each step's dot coloured by the t it was trained at (the paper's t: low t = little noise, high
t = much), sized so that its labels stay legible when the node shows it at a few hundred pixels wide. The
IS / TS trade-off plot of Evaluate T-LoRA (`tradeoff_image`)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

AXIS = (0, 0, 0)
GRID = (228, 228, 228)
RAW = (185, 185, 185)
EMA = (20, 80, 200)
T_LOW, T_HIGH = (250, 170, 40), (120, 20, 140)  # dot colour at t = 0 and at t = T
FONT_PX = 17
TICK_PX = 6


@dataclass(frozen=True)
class Frame:
    """Where data lands: the plot box in pixels (axes on its left and bottom edges) and the data range
    its edges stand for."""

    left: int
    top: int
    right: int
    bottom: int
    x_range: tuple[float, float]
    y_range: tuple[float, float]
    y_step: float  # between loss ticks; both ends of y_range are ticks

    def x(self, value: float) -> float:
        lo, hi = self.x_range
        return self.left + (self.right - self.left) * (value - lo) / (hi - lo)

    def y(self, value: float) -> float:
        lo, hi = self.y_range
        return self.bottom - (self.bottom - self.top) * (value - lo) / (hi - lo)


def ema(values: Sequence[float], beta: float) -> list[float]:
    """Exponential moving average with bias correction, so the first points are not pulled to zero."""
    out, acc = [], 0.0
    for i, v in enumerate(values, 1):
        acc = beta * acc + (1 - beta) * v
        out.append(acc / (1 - beta ** i))
    return out


def ema_span(n: int) -> int:
    """Steps the smoothing spans: about a tenth of the run, 3 to 50."""
    return round(min(max(n / 10, 3.0), 50.0))


def nice_step(span: float, count: int) -> float:
    """A 1, 2 or 5 times a power of ten step giving about `count` intervals over `span`."""
    raw = span / max(count, 1) * (1 - 1e-9)  # a span of exactly `count` steps keeps that step
    power = 10 ** math.floor(math.log10(raw))
    return next(m * power for m in (1, 2, 5, 10) if m * power >= raw)


def ticks(lo: float, hi: float, step: float) -> list[float]:
    """The multiples of `step` inside [lo, hi]."""
    first = math.ceil(lo / step - 1e-9) * step
    return [round(first + k * step, 12) for k in range(int((hi - first) / step + 1e-9) + 1)]


def y_bounds(values: Sequence[float], count: int) -> tuple[float, float, float]:
    """The loss axis' range (the data's, widened outwards to round tick values) and its tick step."""
    lo, hi = min(values), max(values)
    if hi - lo < 1e-12:
        lo, hi = lo - (abs(lo) or 1.0) * 0.1, hi + (abs(hi) or 1.0) * 0.1
    step = nice_step(hi - lo, count)
    return math.floor(lo / step + 1e-9) * step, math.ceil(hi / step - 1e-9) * step, step


def label(value: float) -> str:
    return f"{value:.4g}"


def t_colour(t: float, max_t: float) -> tuple[int, int, int]:
    f = min(max(t / max_t, 0.0), 1.0)
    return tuple(round(a + (b - a) * f) for a, b in zip(T_LOW, T_HIGH))


def chart_frame(losses: Sequence[float], first_step: int, width: int, height: int) -> Frame:
    """The plot box for this image size and data: room left for loss labels, below for steps, above for
    the legend."""
    last = first_step + max(len(losses) - 1, 1)
    lo, hi, step = y_bounds(losses, 5) if losses else (0.0, 1.0, 0.2)
    return Frame(left=78, top=40, right=width - 22, bottom=height - 56, x_range=(first_step, last),
                 y_range=(lo, hi), y_step=step)


def draw_axes(draw: ImageDraw.ImageDraw, f: Frame, font) -> None:
    """Grid, axes on the box's left and bottom edges, tick marks outside them, tick and axis labels."""
    for v in ticks(*f.y_range, f.y_step):
        y = round(f.y(v))
        draw.line([(f.left, y), (f.right, y)], fill=GRID, width=1)
        draw.line([(f.left - TICK_PX, y), (f.left, y)], fill=AXIS, width=2)
        draw.text((f.left - TICK_PX - 4, y), label(v), fill=AXIS, font=font, anchor="rm")
    for v in ticks(*f.x_range, max(nice_step(f.x_range[1] - f.x_range[0], 6), 1.0)):
        x = round(f.x(v))
        draw.line([(x, f.bottom), (x, f.bottom + TICK_PX)], fill=AXIS, width=2)
        draw.text((x, f.bottom + TICK_PX + 2), label(v), fill=AXIS, font=font, anchor="mt")
    draw.line([(f.left, f.top), (f.left, f.bottom)], fill=AXIS, width=2)
    draw.line([(f.left, f.bottom), (f.right, f.bottom)], fill=AXIS, width=2)
    draw.text(((f.left + f.right) / 2, f.bottom + TICK_PX + FONT_PX + 8), "step", fill=AXIS, font=font, anchor="mt")
    draw.text((6, f.top - 8), "loss", fill=AXIS, font=font, anchor="ls")


def draw_legend(draw: ImageDraw.ImageDraw, f: Frame, font, span: int, max_t: Optional[float]) -> None:
    """One line above the box: what the faint line, the bold line and the dots' colours mean."""
    x, y = f.left + 8, f.top - 20
    for text, colour, width in (("raw", RAW, 2), (f"EMA ~{span} steps", EMA, 4)):
        draw.line([(x, y), (x + 22, y)], fill=colour, width=width)
        draw.text((x + 28, y), text, fill=AXIS, font=font, anchor="lm")
        x = draw.textbbox((x + 28, y), text, font=font, anchor="lm")[2] + 18
    if max_t is None:
        return
    draw.text((x, y), "t 0", fill=AXIS, font=font, anchor="lm")
    x = draw.textbbox((x, y), "t 0", font=font, anchor="lm")[2]
    for k in range(60):
        draw.line([(x + 4 + k, y - 6), (x + 4 + k, y + 6)], fill=t_colour(k / 59 * max_t, max_t))
    draw.text((x + 70, y), f"{max_t:g}", fill=AXIS, font=font, anchor="lm")


def loss_curve_image(losses: Sequence[float], timesteps: Optional[Sequence[float]] = None, first_step: int = 1,
                     max_t: float = 1000.0, width: int = 640, height: int = 400) -> torch.Tensor:
    """[1, height, width, 3] float IMAGE of the loss per step (steps `first_step`, `first_step` + 1, ...);
    with `timesteps` (one t per step, 0..max_t) each step's dot is coloured by its t."""
    if timesteps is not None and len(timesteps) != len(losses):
        raise ValueError(f"loss_curve_image got {len(timesteps)} timesteps for {len(losses)} losses; "
                         f"give one t per step or none.")
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=FONT_PX)
    f = chart_frame(losses, first_step, width, height)
    draw_axes(draw, f, font)
    span = ema_span(len(losses))
    beta = 1 - 2 / (span + 1)  # the usual EMA whose weights have the centre of mass of a `span`-step mean
    draw_legend(draw, f, font, span, max_t if timesteps is not None else None)
    points = [(f.x(first_step + i), f.y(v)) for i, v in enumerate(losses)]
    if len(points) > 1:
        draw.line(points, fill=RAW, width=2)
    if timesteps is not None:
        r = 3 if len(points) <= 400 else 2
        for (x, y), t in zip(points, timesteps):
            draw.ellipse([x - r, y - r, x + r, y + r], fill=t_colour(t, max_t))
    smoothed = [(f.x(first_step + i), f.y(v)) for i, v in enumerate(ema(losses, beta))]
    if len(smoothed) > 1:
        draw.line(smoothed, fill=EMA, width=4, joint="curve")
    if not losses:
        draw.text(((f.left + f.right) / 2, (f.top + f.bottom) / 2), "no steps", fill=AXIS, font=font, anchor="mm")
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

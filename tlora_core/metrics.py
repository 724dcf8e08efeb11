"""The paper's two scores from embeddings, and the choice of the best trade-off between them.

IS (image similarity) and TS (text similarity) are the measures the T-LoRA paper plots against each
other (Sec. 4; DreamBooth's CLIP-I and CLIP-T): cosine similarities of L2-normalised CLIP embeddings,
averaged over every generated image. The embeddings come from elsewhere (trainer/evaluate.py); this
module only does the arithmetic, in float64 so that averages over many images do not drift.
"""
from __future__ import annotations

import math

import torch

from .errors import TLoraError


def unit_rows(x: torch.Tensor) -> torch.Tensor:
    """Each row of a [N, D] matrix divided by its L2 norm, in float64. A zero row has no direction: refused."""
    x = x.detach().to("cpu", torch.float64).reshape(x.shape[0], -1)
    norms = x.norm(dim=1, keepdim=True)
    if not torch.isfinite(x).all() or (norms == 0).any():
        raise TLoraError("an embedding is zero or not finite, so it has no direction to compare; the encoder "
                         "that made it is broken or was loaded without its weights.")
    return x / norms


def image_similarity(generated: torch.Tensor, references: torch.Tensor) -> float:
    """IS: the mean cosine over every pair (generated image, training image): [N, D] x [M, D] -> scalar."""
    return float((unit_rows(generated) @ unit_rows(references).T).mean())


def text_similarity(generated: torch.Tensor, texts: torch.Tensor) -> float:
    """TS: the mean cosine of each generated image with the text of its own prompt: [N, D] x [N, D] -> scalar."""
    if generated.shape[0] != texts.shape[0]:
        raise TLoraError(f"{generated.shape[0]} images but {texts.shape[0]} prompt embeddings; each image needs "
                         f"the embedding of the prompt it was sampled with.")
    return float((unit_rows(generated) * unit_rows(texts)).sum(dim=1).mean())


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point dominates (at least as high on both scores, higher on one)."""
    def dominated(i):
        a = points[i]
        return any(b[0] >= a[0] and b[1] >= a[1] and b != a for b in points)
    return [i for i in range(len(points)) if not dominated(i)]


def best_tradeoff(points: list[tuple[float, float]]) -> int:
    """The index of the point closest to the ideal (the highest IS and the highest TS of all points), each
    score measured in units of its own range over the points, so that IS (~0.9) and TS (~0.27) weigh alike.

    The closest point is always on the Pareto front. Ties go to the higher TS (more prompt following),
    then to the earlier point. A score that is the same everywhere does not decide anything.
    """
    if not points:
        raise TLoraError("there is no candidate to choose from; give at least one T-LoRA file or object.")
    if not all(math.isfinite(v) for p in points for v in p):
        raise TLoraError(f"a score is not a finite number ({points}); a sample came out as NaN.")
    ideal = [max(p[k] for p in points) for k in (0, 1)]
    span = [(max(p[k] for p in points) - min(p[k] for p in points)) or 1.0 for k in (0, 1)]

    def distance(p):
        return math.hypot((ideal[0] - p[0]) / span[0], (ideal[1] - p[1]) / span[1])
    return min(range(len(points)), key=lambda i: (distance(points[i]), -points[i][1], i))

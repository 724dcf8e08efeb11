"""Evaluate T-LoRAs with the paper's metrics inside ComfyUI: sample, embed, score.

Every candidate (a T-LoRA at one r_min and one strength) samples every prompt with every seed exactly
as KSampler would (ComfyUI's prepare_noise and comfy.sample.sample on an empty latent, the T-LoRA put
on a clone of the model by Apply T-LoRA's own function), the VAE decodes the latent, and CLIP_VISION's
`image_embeds` (the projected image embedding) of the picture is kept; the picture is not. IS and TS
are then the cosines of tlora_core.metrics. The text side of TS must live in the same space as those
image embeddings: it is the projected pooled output of a CLIP text tower that is CLIP_VISION's twin
(see `text_embeds`).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Optional

import torch

import comfy.model_management as mm
import comfy.sample

from ..tlora_core.errors import TLoraError
from ..tlora_core.format import TLora
from ..tlora_core.metrics import best_tradeoff, image_similarity, pareto_front, text_similarity
from .runtime import apply_tlora

LATENT_DOWNSCALE = 8  # pixels per latent cell of every image family the pack trains


@dataclass(frozen=True)
class Candidate:
    """One point of the plot: a T-LoRA at one r_min (None: its own) and one strength."""

    name: str
    tlora: TLora
    min_rank: Optional[int] = None
    strength: float = 1.0

    @property
    def r_min(self) -> int:
        """The r_min it samples with (an unmasked variant's own is its full rank)."""
        return self.tlora.config.schedule_min_rank if self.min_rank is None else self.min_rank

    def label(self) -> str:
        return f"{self.name} r_min {self.r_min} x{self.strength:g}"


@dataclass(frozen=True)
class Prompt:
    """What the model is asked for (with the trigger word) and what TS compares the image with (without it)."""

    sample: str
    score: str


@dataclass(frozen=True)
class SamplingSettings:
    """KSampler's settings for every sample; seeds seed .. seed + images_per_prompt - 1 for every prompt."""

    steps: int = 25
    cfg: float = 5.0
    sampler: str = "euler"
    scheduler: str = "normal"
    width: int = 512
    height: int = 512
    seed: int = 0
    images_per_prompt: int = 1
    negative: str = ""
    guidance: Optional[float] = None  # for guidance-distilled models (Flux), as the family's previews

    def seeds(self) -> range:
        return range(self.seed, self.seed + self.images_per_prompt)


@dataclass(frozen=True)
class Score:
    candidate: Candidate
    image_similarity: float
    text_similarity: float
    dino: Optional[float] = None


def image_embeds(clip_vision, images: torch.Tensor) -> torch.Tensor:
    """CLIP_VISION's projected embedding of each image of an IMAGE batch ([B, H, W, C]) -> [B, D] float32,
    with ComfyUI's CLIP preprocessing (resize the short side, centre crop, the encoder's mean / std)."""
    with torch.no_grad():
        return clip_vision.encode_image(images[..., :3])["image_embeds"].float().reshape(images.shape[0], -1)


def _projection(clip):
    """The Linear of a CLIP text tower that maps its pooled output into the joint space, for a CLIP whose pooled
    output ComfyUI leaves unprojected (one tower named by `.clip`, as SD 1.x's CLIP-L); None when there is none."""
    model = clip.cond_stage_model
    tower = getattr(model, getattr(model, "clip", None) or "", None)
    return getattr(getattr(tower, "transformer", None), "text_projection", None)


def projected_pooled(clip, text: str, own_projection: bool) -> torch.Tensor:
    """[1, D]: the text's pooled output projected into CLIP's joint image-text space.

    ComfyUI projects it itself for towers whose model uses it that way (SD-XL's CLIP-G, SD 2.x's CLIP-H:
    their checkpoints carry the projection). SD 1.x's CLIP-L is left unprojected, and SD 1.x checkpoints
    do not even hold its projection (ComfyUI leaves that layer unset), so the tower's own text_projection
    is applied only when `own_projection` says the user connected a full CLIP file for it.
    """
    tokens = clip.tokenize(text)
    _, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
    _, raw = clip.encode_from_tokens(tokens, return_pooled="unprojected")
    if pooled is None or raw is None:
        raise TLoraError("the text encoder for TS gives no pooled output; connect a CLIP text tower (the twin of "
                         "clip_vision, loaded with Load CLIP) to 'ts_clip'.")
    if not torch.equal(pooled, raw):
        return pooled.float().reshape(1, -1).cpu()
    layer = _projection(clip)
    if not own_projection or layer is None:
        raise TLoraError("TS needs text embeddings in clip_vision's space, and this CLIP's pooled output is not "
                         "projected there (SD 1.x checkpoints do not hold CLIP-L's text projection). Load "
                         "clip_vision's own text tower (e.g. openai clip-vit-large-patch14, the same file as a ViT-L "
                         "clip_vision) with Load CLIP and connect it to 'ts_clip'.")
    with torch.no_grad():
        projected = layer(raw.to(layer.weight.device, torch.float32)).float().reshape(1, -1).cpu()
    if not projected.norm() > 1e-6 * raw.float().norm():
        raise TLoraError("the 'ts_clip' text encoder's projection is zero: its file has no text projection. Load a "
                         "full CLIP file (text and projection, e.g. openai clip-vit-large-patch14) with Load CLIP.")
    return projected


def text_embeds(score_clip, texts: list[str], width: int, own_projection: bool) -> torch.Tensor:
    """[P, D]: each text's embedding in the space of clip_vision's image embeddings, where TS is measured;
    a tower whose width differs from the image embeddings' `width` is not the same CLIP: refused."""
    out = torch.cat([projected_pooled(score_clip, text, own_projection) for text in texts])
    if out.shape[1] != width:
        raise TLoraError(f"the TS text embeddings have {out.shape[1]} values but clip_vision's image embeddings have "
                         f"{width}: they are not the same CLIP. Load clip_vision's own text tower (e.g. the same CLIP "
                         f"file) with Load CLIP and connect it to 'ts_clip'.")
    return out


def encode_prompt(clip, text: str, guidance: Optional[float]):
    """A CONDITIONING as CLIPTextEncode makes it (plus FluxGuidance's value for guidance-distilled models)."""
    cond = clip.encode_from_tokens_scheduled(clip.tokenize(text))
    return cond if guidance is None else [[c, {**extra, "guidance": guidance}] for c, extra in cond]


def sample_image(model, vae, positive, negative, settings: SamplingSettings, seed: int) -> torch.Tensor:
    """One image ([1, H, W, 3]) as EmptyLatentImage -> KSampler (denoise 1) -> VAEDecode would give it."""
    empty = torch.zeros([1, 4, settings.height // LATENT_DOWNSCALE, settings.width // LATENT_DOWNSCALE])
    latent = comfy.sample.fix_empty_latent_channels(model, empty)
    noise = comfy.sample.prepare_noise(latent, seed)
    samples = comfy.sample.sample(model, noise, settings.steps, settings.cfg, settings.sampler, settings.scheduler,
                                  positive, negative, latent, denoise=1.0, disable_pbar=True, seed=seed)
    images = vae.decode(samples)
    return images.reshape(-1, *images.shape[-3:])[..., :3]  # video VAEs add a frame axis


Progress = Callable[[int, int], None]


def evaluate(model, clip, vae, clip_vision, references: torch.Tensor, candidates: list[Candidate],
             prompts: list[Prompt], settings: SamplingSettings, progress: Optional[Progress] = None,
             ts_clip=None, dino=None) -> list[Score]:
    """IS, TS (and DINO, with a second image encoder) of every candidate over prompts x seeds.

    references: the training IMAGE batch; IS averages over every (sample, training image) pair.
    ts_clip: the text tower for TS (clip_vision's twin); None: `clip`, when ComfyUI projects its pooled output.
    progress(done, total) is called after every sample; ComfyUI's Cancel stops between two samples.
    """
    if not candidates or not prompts:
        raise TLoraError("nothing to evaluate: give at least one T-LoRA candidate and one prompt.")
    for c in candidates:  # before any sampling: a bad r_min would otherwise stop the run half-way
        if not 1 <= c.r_min <= c.tlora.config.rank:
            raise TLoraError(f"r_min {c.r_min} does not fit {c.name} (rank {c.tlora.config.rank}); give r_min values "
                             f"from 1 to {c.tlora.config.rank} in min_ranks (0 = the file's own).")
    reference = image_embeds(clip_vision, references)
    texts = text_embeds(ts_clip or clip, [p.score for p in prompts], reference.shape[1], ts_clip is not None)
    dino_reference = image_embeds(dino, references) if dino is not None else None
    negative = encode_prompt(clip, settings.negative, None)
    positives = [encode_prompt(clip, p.sample, settings.guidance) for p in prompts]
    total, done, scores = len(candidates) * len(prompts) * settings.images_per_prompt, 0, []
    for candidate in candidates:
        patched, _ = apply_tlora(model, candidate.tlora, candidate.strength, min_rank=candidate.min_rank)
        clip_rows, dino_rows, text_rows = [], [], []
        for prompt_index, positive in enumerate(positives):
            for seed in settings.seeds():
                mm.throw_exception_if_processing_interrupted()
                image = sample_image(patched, vae, positive, negative, settings, seed)
                clip_rows.append(image_embeds(clip_vision, image))
                text_rows.append(texts[prompt_index:prompt_index + 1])
                if dino is not None:
                    dino_rows.append(image_embeds(dino, image))
                done += 1
                if progress is not None:
                    progress(done, total)
        generated = torch.cat(clip_rows)
        scores.append(Score(candidate, image_similarity(generated, reference),
                            text_similarity(generated, torch.cat(text_rows)),
                            image_similarity(torch.cat(dino_rows), dino_reference) if dino is not None else None))
        logging.info("T-LoRA evaluation: %s: IS %.4f, TS %.4f", candidate.label(), scores[-1].image_similarity,
                     scores[-1].text_similarity)
    return scores


@dataclass(frozen=True)
class Verdict:
    scores: list[Score]
    front: list[int]   # indices on the Pareto front
    best: int          # index of the chosen candidate


def choose(scores: list[Score]) -> Verdict:
    points = [(s.image_similarity, s.text_similarity) for s in scores]
    return Verdict(scores, pareto_front(points), best_tradeoff(points))


def table(verdict: Verdict, prompts: list[Prompt], settings: SamplingSettings) -> dict:
    """The JSON the node returns: one row per candidate, the chosen one, and how the numbers were made."""
    rows = []
    for i, s in enumerate(verdict.scores):
        c = s.candidate
        rows.append({"file": c.name, "r_min": c.r_min,
                     "strength": c.strength, "IS": s.image_similarity, "TS": s.text_similarity,
                     **({"DINO": s.dino} if s.dino is not None else {}),
                     "pareto": i in verdict.front, "best": i == verdict.best})
    return {"candidates": rows, "best": rows[verdict.best],
            "prompts": [p.sample for p in prompts], "ts_prompts": [p.score for p in prompts],
            "seeds": list(settings.seeds()), "sampler": {
                "steps": settings.steps, "cfg": settings.cfg, "sampler": settings.sampler,
                "scheduler": settings.scheduler, "width": settings.width, "height": settings.height}}

"""Node "Evaluate T-LoRA": the paper's IS and TS for T-LoRA files at several r_min and strengths, and the pick."""
from __future__ import annotations

import fnmatch
import json
import re
from pathlib import Path

import comfy.samplers
import folder_paths
from comfy.utils import ProgressBar
from comfy_api.latest import io, ui

from ..tlora_core.errors import TLoraError
from ..trainer.evaluate import Candidate, Prompt, SamplingSettings, choose, evaluate, table
from ..trainer.plot import tradeoff_image
from ..trainer.runtime import base_weight_lookup, check_overrides
from ..trainer.train import model_family
from ..tlora_core.readers import read_any
from .common import CATEGORY, TLoraType, user_errors
from .train import fill_prompt

# Contexts like the paper's contextual prompts (DreamBooth's kind): the subject somewhere it was not.
DEFAULT_PROMPTS = "\n".join([
    "a photo of {trigger} {class} on the beach",
    "a photo of {trigger} {class} in the snow",
    "a photo of {trigger} {class} in the jungle",
    "a photo of {trigger} {class} on a cobblestone street",
    "a photo of {trigger} {class} with a city in the background",
    "a photo of {trigger} {class} with a mountain in the background",
    "a red {trigger} {class}",
    "a watercolor painting of {trigger} {class}",
])

RULE = ("Chosen: the candidate closest to the ideal point (the best IS and the best TS of all candidates), each "
        "score measured in units of its range over the candidates; that point is always on the Pareto front "
        "(no other candidate is at least as good on both scores). Ties go to the higher TS.")


def _numbers(text: str, kind, name: str) -> list:
    try:
        values = [kind(v) for v in re.split(r"[,\s]+", text.strip()) if v]
    except ValueError:
        raise TLoraError(f"{name} = {text!r}: give numbers separated by commas, e.g. "
                         f"{'8, 16, 32' if kind is int else '0.8, 1.0'}.") from None
    if not values:
        raise TLoraError(f"{name} is empty; give at least one value ({'0 = the file' if kind is int else '1.0'}).")
    return list(dict.fromkeys(values))


def resolve_files(text: str) -> list[str]:
    """The names under models/loras that the lines of `text` give; a line with * or ? matches names (sorted)."""
    known = folder_paths.get_filename_list("loras")
    names = []
    for line in (ln.strip() for ln in text.splitlines()):
        if not line or line.startswith("#"):
            continue
        found = sorted(n for n in known if fnmatch.fnmatchcase(n.replace("\\", "/"), line)) \
            if any(c in line for c in "*?[") else [n for n in known if n.replace("\\", "/") == line]
        if not found:
            raise TLoraError(f"files: {line!r} matches no file under models/loras; give a name the Load T-LoRA "
                             f"node lists, or a pattern such as 'tlora/sks_dog_*.safetensors'.")
        names += [n for n in found if n not in names]
    return names


def candidates(model, files: str, tlora, min_ranks: list[int], strengths: list[float]) -> list[Candidate]:
    """Every (T-LoRA, r_min, strength): the files, then the TLORA input unless it is one of those files."""
    loras = Path(folder_paths.get_folder_paths("loras")[0]).resolve()
    sources = []
    for name in resolve_files(files):
        path = Path(folder_paths.get_full_path_or_raise("loras", name))
        sources.append((name, read_any(path, base_weights=base_weight_lookup(model.model))))
    if tlora is not None:
        origin = Path(tlora.origin).resolve() if tlora.origin else None
        if origin is None or all(Path(folder_paths.get_full_path("loras", n)).resolve() != origin for n, _ in sources):
            name = origin.relative_to(loras).as_posix() if origin and loras in origin.parents else "TLORA input"
            sources.append((name, tlora))
    if not sources:
        raise TLoraError("no T-LoRA to evaluate: name files under models/loras in 'files' or connect 'tlora'.")
    return [Candidate(name, t, r or None, s) for name, t in sources for r in min_ranks for s in strengths]


def prompt_pairs(text: str, trigger: str, class_word: str) -> list[Prompt]:
    """Each line: the prompt sampled (trigger and class filled in) and the TS text (the trigger left out)."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines:
        raise TLoraError("prompts is empty; give one prompt per line, e.g. "
                         "'a photo of {trigger} {class} on the beach'.")
    return [Prompt(fill_prompt(t, trigger, class_word), " ".join(fill_prompt(t, "", class_word).split()))
            for t in lines]


class TLoraEvaluate(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="TLoraEvaluate", display_name="Evaluate T-LoRA", category=CATEGORY,
            description="Measures T-LoRAs with the paper's metrics: IS (CLIP image similarity of the samples to the "
                        "training image) and TS (CLIP similarity of the samples to their prompt without the trigger "
                        "word), for every file x r_min x strength, over prompts x seeds; plots IS against TS and "
                        "picks the best trade-off.",
            inputs=[
                io.Model.Input("model", tooltip="The base model the T-LoRAs were trained on (it is not changed)."),
                io.Clip.Input("clip", tooltip="The model's text encoder: encodes the prompts the samples are made "
                                              "with."),
                io.Vae.Input("vae", tooltip="Decodes the samples."),
                io.ClipVision.Input("clip_vision",
                                    tooltip="CLIP image encoder (Load CLIP Vision) for IS and TS, e.g. CLIP ViT-L/14 "
                                            "or ViT-bigG. Its image embeddings are compared."),
                io.Image.Input("image", tooltip="The training image(s): IS compares every sample with each of them."),
                io.String.Input("files", default="tlora/sks_dog_*.safetensors", multiline=True,
                                tooltip="T-LoRA files under models/loras, one per line; * and ? match several "
                                        "(e.g. every file a run saved with save_every). Lines starting with # "
                                        "are skipped. May be empty when 'tlora' is connected."),
                io.String.Input("trigger", default="sks", tooltip="The trigger word of the training prompt."),
                io.String.Input("class_word", default="dog", tooltip="The class word of the training prompt."),
                io.String.Input("prompts", default=DEFAULT_PROMPTS, multiline=True,
                                tooltip="One prompt per line, {trigger} and {class} filled in. TS compares each "
                                        "sample with its prompt without the trigger word ('a photo of dog on the "
                                        "beach'), as DreamBooth's CLIP-T."),
                io.String.Input("min_ranks", default="0",
                                tooltip="r_min values to try, comma-separated (0 = each file's own). Lower = more "
                                        "prompt following, higher = more fidelity."),
                io.String.Input("strengths", default="1.0", tooltip="Strengths to try, comma-separated (0 = the base "
                                                                     "model, a useful reference point)."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFF, control_after_generate=False,
                             tooltip="First seed; every prompt is sampled with seeds seed .. seed + images - 1."),
                io.Int.Input("images_per_prompt", default=1, min=1, max=64,
                             tooltip="Samples per prompt and candidate (seeds). More = steadier numbers, slower."),
                io.Int.Input("steps", default=25, min=1, max=200, tooltip="Sampling steps (paper: 25)."),
                io.Float.Input("cfg", default=0.0, min=0.0, max=30.0, step=0.1,
                               tooltip="CFG scale. 0 = the family's (SD: 5 as the paper; Flux: 1 at guidance 3.5)."),
                io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS, default="euler",
                               tooltip="Sampler, as KSampler's."),
                io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS, default="normal",
                               tooltip="Scheduler, as KSampler's."),
                io.Int.Input("resolution", default=0, min=0, max=4096, step=64,
                             tooltip="Sample size in px (square). 0 = the model's native size (SD 1.5: 512, "
                                     "SD-XL and Flux: 1024)."),
                TLoraType.Input("tlora", optional=True,
                                tooltip="Optional: a T-LoRA object (e.g. the Train node's) evaluated too. Connecting "
                                        "the Train node also makes this node wait for training, so 'files' can "
                                        "name the files it saves."),
                io.Clip.Input("ts_clip", optional=True,
                              tooltip="Optional: the text tower that is clip_vision's twin (the same CLIP file loaded "
                                      "with Load CLIP), for TS. Not connected: 'clip' is used, which is right for "
                                      "SD-XL's CLIP with CLIP ViT-bigG vision; SD 1.x checkpoints lack the text "
                                      "projection and are refused."),
                io.ClipVision.Input("dino", optional=True,
                                    tooltip="Optional: a DINOv2 image encoder (Load CLIP Vision) for a DINO score "
                                            "(IS with DINO's embeddings) in the table."),
                io.String.Input("negative_prompt", default="", optional=True,
                                tooltip="Negative prompt of every sample."),
            ],
            outputs=[io.String.Output(display_name="table", tooltip="JSON: IS, TS (DINO) per candidate, the chosen "
                                                                    "one, prompts, seeds and sampler settings."),
                     io.Image.Output(display_name="plot", tooltip="IS against TS; blue = Pareto front, red ring = "
                                                                  "chosen. " + RULE),
                     io.String.Output(display_name="best_file", tooltip="The chosen candidate's file. " + RULE)],
            hidden=[io.Hidden.unique_id])

    @classmethod
    @user_errors
    def execute(cls, model, clip, vae, clip_vision, image, files, trigger, class_word, prompts, min_ranks,
                strengths, seed, images_per_prompt, steps, cfg, sampler_name, scheduler, resolution,
                tlora=None, ts_clip=None, dino=None, negative_prompt="") -> io.NodeOutput:
        r_mins, gains = _numbers(min_ranks, int, "min_ranks"), _numbers(strengths, float, "strengths")
        for r, s in ((r, s) for r in r_mins for s in gains):
            check_overrides(s, r or None)
        recipe = model_family(model.model).recipe
        size = resolution or recipe.resolution
        settings = SamplingSettings(steps, cfg or recipe.preview.cfg, sampler_name, scheduler, size, size, seed,
                                    images_per_prompt, negative_prompt, recipe.preview.guidance)
        found = candidates(model, files, tlora, r_mins, gains)
        asked = prompt_pairs(prompts, trigger, class_word)
        bar = ProgressBar(len(found) * len(asked) * images_per_prompt, node_id=cls.hidden.unique_id)
        scores = evaluate(model, clip, vae, clip_vision, image, found, asked, settings,
                          progress=lambda done, total: bar.update_absolute(done, total), ts_clip=ts_clip, dino=dino)
        verdict = choose(scores)
        plot = tradeoff_image([(s.image_similarity, s.text_similarity) for s in scores],
                              [s.candidate.label() for s in scores], verdict.front, verdict.best)
        best = scores[verdict.best].candidate
        return io.NodeOutput(json.dumps(table(verdict, asked, settings), indent=1), plot, best.name,
                             ui=ui.PreviewText(f"chosen: {best.label()}"))


NODES = [TLoraEvaluate]

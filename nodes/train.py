"""Node "Train T-LoRA from image": one photo in, a T-LoRA out, on the MODEL ComfyUI already loaded."""
from __future__ import annotations

import functools
from pathlib import Path

import torch

import comfy.model_management as mm
import folder_paths
import latent_preview
from comfy.utils import ProgressBar
from comfy_api.latest import io, ui
from comfy_execution.graph_utils import ExecutionBlocker

from ..trainer.plot import loss_curve_image
from ..trainer.memory import MEMORY_CHOICES, OFF, plan_memory
from ..trainer.preview import PreviewSettings
from ..trainer.runtime import apply_tlora
from ..trainer.settings import TRAINING_DTYPES, TrainSettings
from ..trainer.train import config_class_names, model_family, train_tlora
from ..tlora_core.families import AUTO, OPTIMIZERS, TARGET_SETS
from ..tlora_core.config import ORTHO_INITS, VARIANTS
from .common import CATEGORY, TLoraType, user_errors


class NodeProgress:
    """What the node shows while it trains: the step in its progress bar, 'step / loss' text under it,
    and each preview image, through ComfyUI's own latent previewer (the one set for the server or the
    prompt; when that is "none", the cheap latent-to-RGB one: the user asked for previews)."""

    def __init__(self, node_id, total: int, model):
        self.node_id, self.bar = node_id, ProgressBar(total, node_id=node_id)
        try:
            from server import PromptServer
            self.server = PromptServer.instance
        except (ImportError, AttributeError):
            self.server = None
        self.sid = getattr(self.server, "client_id", None)  # the client whose prompt is running now
        self.model = model

    def __call__(self, step: int, steps: int, loss: float):
        self.bar.update_absolute(step, steps)
        if self.server is not None and self.node_id is not None:
            # To the client that queued this prompt (None, e.g. from a script: every client).
            self.server.send_progress_text(f"step {step}/{steps}  loss {loss:.4f}", self.node_id, self.sid)

    def preview(self, step: int, steps: int, latent: torch.Tensor):
        if self.previewer is not None:
            self.bar.update_absolute(step, steps, self.previewer.decode_latent_to_preview_image("JPEG", latent))

    @functools.cached_property
    def previewer(self):  # once per run: a TAESD previewer loads its model
        fmt = self.model.model.latent_format
        found = latent_preview.get_previewer(self.model.load_device, fmt)
        if found is None and fmt.latent_rgb_factors is not None:
            found = latent_preview.Latent2RGBPreviewer(fmt.latent_rgb_factors, fmt.latent_rgb_factors_bias,
                                                       getattr(fmt, "latent_rgb_factors_reshape", None))
        return found


def fill_prompt(template: str, trigger: str, class_word: str, prompt: str = "") -> str:
    """A prompt template with {trigger}, {class} and (for the preview prompt) {prompt} filled in."""
    return template.replace("{prompt}", prompt).replace("{trigger}", trigger).replace("{class}", class_word)


class TLoraTrainFromImage(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="TLoraTrainFromImage", display_name="Train T-LoRA from image", category=CATEGORY,
            description="Fine-tunes a T-LoRA on one image (or 2-3) inside the graph, on the loaded model. "
                        "High-noise steps train only the first r_min components, so the subject is learned "
                        "without copying the photo's background and pose.",
            inputs=[
                io.Model.Input("model", tooltip="The model to personalise (it is not changed)."),
                io.Clip.Input("clip", optional=True,
                              tooltip="Encodes the training prompt (frozen). Not needed when 'conditioning' is "
                                      "connected."),
                io.Vae.Input("vae", tooltip="Encodes the image once (frozen)."),
                io.Image.Input("image", tooltip="One image (2-3 for the paper's multi-image setting)."),
                io.String.Input("trigger", default="sks", tooltip="Rare word that will stand for the subject."),
                io.String.Input("class_word", default="dog", tooltip="What the subject is (dog, person, mug...)."),
                io.String.Input("prompt_template", default="a photo of {trigger} {class}",
                                tooltip="Training prompt; {trigger} and {class} are filled in."),
                io.Combo.Input("variant", options=[AUTO, *VARIANTS], default=AUTO,
                               tooltip="auto: the model family's recipe (SD: tlora; Flux and other DiTs: "
                                       "vanilla_tlora, as the reference FLUX code). tlora: the paper (ortho init + "
                                       "timestep mask). vanilla_tlora: mask only. ortho_lora: ortho init only. "
                                       "lora: plain LoRA, for comparison."),
                io.Int.Input("rank", default=0, min=0, max=512,
                             tooltip="Rank r of each adapter. 0 = the family's recipe (SD: 64, as the paper; "
                                     "Flux and other DiTs: 32, as the reference FLUX code)."),
                io.Int.Input("min_rank", default=0, min=0, max=512,
                             tooltip="r_min: rank at the highest noise. Lower = less overfitting. 0 = the "
                                     "family's recipe (SD: r/2; Flux: 1 of 32)."),
                io.Int.Input("steps", default=0, min=0, max=100000,
                             tooltip="Optimiser steps. 0 = the family's recipe (SD: 800, Flux: 1000)."),
                io.Float.Input("learning_rate", default=0.0, min=0.0, max=10.0, step=1e-5,
                               tooltip="Learning rate. 0 = the optimizer's recipe: AdamW 1e-4 (the paper), Prodigy "
                                       "1.0 (the reference FLUX code; Prodigy finds its own step size and wants "
                                       "about 1.0)."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFF, control_after_generate=False,
                             tooltip="Seeds init, timesteps and noise. Kept as set (no randomize control): "
                                     "queueing again reuses the trained T-LoRA instead of training again."),
                io.String.Input("filename_prefix", default="tlora/tlora",
                                tooltip="Saved as models/loras/<prefix>_NNNNN.safetensors; never overwrites."),
                io.Mask.Input("mask", optional=True, tooltip="Optional: white = subject. Weights the loss there."),
                TLoraType.Input("resume", optional=True, tooltip="Optional: a T-LoRA to continue training."),
                io.Combo.Input("init", options=list(ORTHO_INITS), default="last",
                               tooltip="Ortho init components: last (paper), middle, principal.", optional=True),
                io.Float.Input("weight_decay", default=1e-4, min=0.0, max=1.0, step=1e-5,
                               tooltip="Decoupled weight decay of AdamW or Prodigy (both references: 1e-4).",
                               optional=True),
                io.Float.Input("exponent", default=1.0, min=0.05, max=8.0, step=0.05,
                               tooltip="Bends the rank schedule r(t); 1 is the paper's line.", optional=True),
                io.Int.Input("resolution", default=0, min=0, max=2048, step=64,
                             tooltip="Training size after centre crop and resize; 0 = the model's native size "
                                     "(SD 1.5: 512, SD-XL and Flux: 1024), as the paper.", optional=True),
                io.Combo.Input("targets", options=list(TARGET_SETS), default="attention",
                               tooltip="Adapted layers: the attention projections of every block (paper; each "
                                       "projection of a fused qkv gets its own adapter) or also feed-forward.",
                               optional=True),
                io.Boolean.Input("gradient_checkpointing", default=False,
                                 tooltip="Recompute activations in the backward pass: less memory, slower steps.",
                                 optional=True),
                io.Combo.Input("training_dtype", options=list(TRAINING_DTYPES), default="auto",
                               tooltip="auto: bf16 autocast on GPUs that support it, fp32 elsewhere. fp32 computes "
                                       "the whole model in float32 (weights stored in 16 or 8 bits are cast up per "
                                       "layer), as the reference trains SD-XL; fp16 uses a gradient scaler.",
                               optional=True),
                io.Int.Input("save_every", default=100, min=0, max=100000,
                             tooltip="Also save every N steps, to pick the best one afterwards (0 = only at the "
                                     "end). Both reference recipes save every 100.", optional=True),
                io.Combo.Input("storage", options=["fp16", "bf16", "fp32"], default="fp16",
                               tooltip="Number format of the saved file. fp16 halves the size at ~4e-4 "
                                       "relative error of the update; fp32 is exact.", optional=True),
                io.Conditioning.Input("conditioning", optional=True,
                                      tooltip="Optional: the training prompt already encoded by your model's own "
                                              "text-encoder nodes (e.g. CLIPTextEncode + FluxGuidance). Used "
                                              "instead of clip + prompt."),
                io.Int.Input("preview_every", default=0, min=0, max=100000, optional=True,
                             tooltip="Sample a preview image with the T-LoRA as it is every N steps, shown on this "
                                     "node and collected in the 'previews' output (0 = off). Costs about "
                                     "preview_steps x 2 model calls each (see the benchmarks)."),
                io.String.Input("preview_prompt", default="{prompt} on the beach", optional=True,
                                tooltip="The previews' prompt: {prompt} is the training prompt; {trigger} and "
                                        "{class} are filled in. A new context shows whether the prompt still "
                                        "steers the image. Needs the clip input."),
                io.Int.Input("preview_steps", default=0, min=0, max=200, optional=True,
                             tooltip="Euler steps of a preview (fixed seed = this node's seed). 0 = the family's "
                                     "(12)."),
                io.Float.Input("preview_cfg", default=0.0, min=0.0, max=30.0, step=0.1, optional=True,
                               tooltip="CFG of the previews. 0 = the family's (SD: 5; Flux: 1 at guidance 3.5; "
                                       "other DiTs: 4). Distilled models (Flux schnell, Z-Image turbo) want 1."),
                io.Combo.Input("optimizer", options=[AUTO, *OPTIMIZERS], default=AUTO, optional=True,
                               tooltip="auto: the family's recipe. adamw: the paper's (SD 1.x / 2.x / SD-XL). "
                                       "prodigy: the reference FLUX code's (Flux and the other flow transformers), "
                                       "with gradients clipped to norm 1.0; needs the prodigyopt package."),
                io.Combo.Input("memory", options=list(MEMORY_CHOICES), default=OFF, optional=True,
                               tooltip="Fit training on your card: a preset turns on gradient checkpointing and "
                                       "caps the resolution as the family needs at that size (README: 'what fits "
                                       "on your card'); the log says when it assumes an fp8 base. auto: picked "
                                       "by the GPU's free memory (on a CPU: no change). off: the settings above."),
            ],
            outputs=[io.Model.Output(display_name="MODEL", tooltip="The model with the trained T-LoRA applied."),
                     TLoraType.Output(display_name="TLORA"),
                     io.String.Output(display_name="file", tooltip="The saved file, relative to models/loras."),
                     io.Image.Output(display_name="loss_curve"),
                     io.Image.Output(display_name="previews",
                                     tooltip="Every preview of this run, oldest first. With none (preview_every 0 or "
                                             "above steps) the nodes it feeds are skipped.")],
            hidden=[io.Hidden.unique_id],
            is_output_node=True)  # writing the file is a goal of its own: a graph of only this node runs

    @classmethod
    @user_errors
    def execute(cls, model, vae, image, trigger, class_word, prompt_template, variant, rank, min_rank,
                steps, learning_rate, seed, filename_prefix, clip=None, mask=None, resume=None, init="last",
                weight_decay=1e-4, exponent=1.0, resolution=0, targets="attention",
                gradient_checkpointing=False, training_dtype="auto", save_every=100,
                storage="fp16", conditioning=None, preview_every=0, preview_prompt="{prompt} on the beach",
                preview_steps=0, preview_cfg=0.0, optimizer=AUTO, memory=OFF) -> io.NodeOutput:
        family = model_family(model.model)
        fit = plan_memory(memory, family, gradient_checkpointing, resolution, model.model.get_dtype(),
                          mm.get_torch_device(), config_classes=config_class_names(model.model))
        recipe = family.recipe.resolve(variant, rank, min_rank, steps)
        settings = TrainSettings(
            **recipe, exponent=exponent, init=init,
            optimizer=optimizer, learning_rate=learning_rate, weight_decay=weight_decay, seed=seed,
            resolution=fit.resolution, targets=targets, gradient_checkpointing=fit.gradient_checkpointing,
            training_dtype=training_dtype,
            save_every=save_every, storage=storage, trigger=trigger, class_word=class_word,
            prompt=fill_prompt(prompt_template, trigger, class_word))
        look = family.recipe.preview
        previews = PreviewSettings(every=preview_every, steps=preview_steps or look.steps, cfg=preview_cfg or look.cfg,
                                   seed=seed, prompt=fill_prompt(preview_prompt, trigger, class_word, settings.prompt),
                                   guidance=look.guidance)
        loras_dir = folder_paths.get_folder_paths("loras")[0]
        progress = NodeProgress(cls.hidden.unique_id, settings.steps, model)
        result = train_tlora(model, clip, vae, image, mask, settings, loras_dir, filename_prefix, resume,
                             progress=progress, conditioning=conditioning, previews=previews,
                             show_preview=progress.preview)
        patched, _ = apply_tlora(model, result.tlora, 1.0)
        name = result.saved[-1].relative_to(Path(loras_dir).resolve()).as_posix()
        # No previews (off, or every > steps): nodes on that output are skipped, not fed an empty batch
        shown = result.previews if result.previews is not None else ExecutionBlocker(None)
        chart = loss_curve_image(result.losses, result.timesteps, result.first_step, result.tlora.config.max_timestep)
        return io.NodeOutput(patched, result.tlora, name, chart, shown,
                             ui=ui.PreviewText(name))


NODES = [TLoraTrainFromImage]

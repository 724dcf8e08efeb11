"""Node "Train T-LoRA from image": one photo in, a T-LoRA out, on the MODEL ComfyUI already loaded."""
from __future__ import annotations

from pathlib import Path

import folder_paths
from comfy.utils import ProgressBar
from comfy_api.latest import io, ui

from ..trainer.plot import loss_curve_image
from ..trainer.runtime import apply_tlora
from ..trainer.settings import TRAINING_DTYPES, TrainSettings
from ..trainer.train import model_family, train_tlora
from ..tlora_core.families import AUTO, TARGET_SETS
from ..tlora_core.config import ORTHO_INITS, VARIANTS
from .common import CATEGORY, TLoraType, user_errors


def _progress_reporter(node_id, total: int):
    """Step counter in the node's progress bar and 'step / loss' text under the node."""
    bar = ProgressBar(total, node_id=node_id)
    try:
        from server import PromptServer
        server = PromptServer.instance
    except (ImportError, AttributeError):
        server = None
    sid = getattr(server, "client_id", None)  # the client whose prompt is running now

    def report(step: int, steps: int, loss: float):
        bar.update_absolute(step, steps)
        if server is not None and node_id is not None:
            # To the client that queued this prompt (None, e.g. from a script: every client).
            server.send_progress_text(f"step {step}/{steps}  loss {loss:.4f}", node_id, sid)
    return report


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
                io.Float.Input("learning_rate", default=1e-4, min=1e-7, max=1e-1, step=1e-5,
                               tooltip="AdamW learning rate (paper: 1e-4)."),
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
                               tooltip="AdamW weight decay (paper: 1e-4).", optional=True),
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
                               tooltip="auto: bf16 autocast on GPUs that support it, fp32 elsewhere.", optional=True),
                io.Int.Input("save_every", default=0, min=0, max=100000,
                             tooltip="Also save every N steps (0 = only at the end).", optional=True),
                io.Combo.Input("storage", options=["fp16", "bf16", "fp32"], default="fp16",
                               tooltip="Number format of the saved file. fp16 halves the size at ~4e-4 "
                                       "relative error of the update; fp32 is exact.", optional=True),
                io.Conditioning.Input("conditioning", optional=True,
                                      tooltip="Optional: the training prompt already encoded by your model's own "
                                              "text-encoder nodes (e.g. CLIPTextEncode + FluxGuidance). Used "
                                              "instead of clip + prompt."),
            ],
            outputs=[io.Model.Output(display_name="MODEL", tooltip="The model with the trained T-LoRA applied."),
                     TLoraType.Output(display_name="TLORA"),
                     io.String.Output(display_name="file", tooltip="The saved file, relative to models/loras."),
                     io.Image.Output(display_name="loss_curve")],
            hidden=[io.Hidden.unique_id],
            is_output_node=True)  # writing the file is a goal of its own: a graph of only this node runs

    @classmethod
    @user_errors
    def execute(cls, model, vae, image, trigger, class_word, prompt_template, variant, rank, min_rank,
                steps, learning_rate, seed, filename_prefix, clip=None, mask=None, resume=None, init="last",
                weight_decay=1e-4, exponent=1.0, resolution=0, targets="attention",
                gradient_checkpointing=False, training_dtype="auto", save_every=0,
                storage="fp16", conditioning=None) -> io.NodeOutput:
        recipe = model_family(model.model).recipe.resolve(variant, rank, min_rank, steps)
        settings = TrainSettings(
            **recipe, exponent=exponent, init=init,
            learning_rate=learning_rate, weight_decay=weight_decay, seed=seed, resolution=resolution,
            targets=targets, gradient_checkpointing=gradient_checkpointing, training_dtype=training_dtype,
            save_every=save_every, storage=storage, trigger=trigger, class_word=class_word,
            prompt=prompt_template.replace("{trigger}", trigger).replace("{class}", class_word))
        loras_dir = folder_paths.get_folder_paths("loras")[0]
        result = train_tlora(model, clip, vae, image, mask, settings, loras_dir, filename_prefix, resume,
                             progress=_progress_reporter(cls.hidden.unique_id, settings.steps),
                             conditioning=conditioning)
        patched, _ = apply_tlora(model, result.tlora, 1.0)
        name = result.saved[-1].relative_to(Path(loras_dir).resolve()).as_posix()
        return io.NodeOutput(patched, result.tlora, name, loss_curve_image(result.losses),
                             ui=ui.PreviewText(name))


NODES = [TLoraTrainFromImage]

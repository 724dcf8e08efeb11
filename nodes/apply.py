"""Nodes that put a T-LoRA on a MODEL: "Load T-LoRA" (from a file) and "Apply T-LoRA" (from an object)."""
from __future__ import annotations

import folder_paths
from comfy_api.latest import io

from ..tlora_core.readers import read_any
from ..trainer.runtime import apply_tlora, base_weight_lookup, check_overrides
from .common import CATEGORY, TLoraType, user_errors


def _schedule_inputs():
    return [
        io.Float.Input("strength", default=1.0, min=-4.0, max=4.0, step=0.01,
                       tooltip="Multiplies the T-LoRA's update. 0 gives the model exactly as it was."),
        io.Int.Input("min_rank", default=0, min=0, max=4096,
                     tooltip="r_min: components kept at the highest noise. 0 uses the T-LoRA's own value. "
                             "Lower = more diversity (less copying of the photo), higher = more fidelity."),
        io.Float.Input("exponent", default=0.0, min=0.0, max=8.0, step=0.05,
                       tooltip="Bends the rank schedule r(t). 0 uses the T-LoRA's own value; 1 is the paper's line."),
    ]


def _overrides(min_rank: int, exponent: float) -> dict:
    return {"min_rank": None if min_rank == 0 else min_rank, "exponent": None if exponent == 0 else exponent}


class TLoraApply(io.ComfyNode):
    """MODEL + T-LoRA object -> MODEL whose rank mask follows the sampler's sigma at every call."""

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="TLoraApply", display_name="Apply T-LoRA", category=CATEGORY,
            description="Adds a T-LoRA to a model. The rank mask is recomputed from the sampler's sigma "
                        "at every model call. The input model is not changed.",
            inputs=[io.Model.Input("model", tooltip="The diffusion model to adapt."),
                    TLoraType.Input("tlora", tooltip="A T-LoRA from 'Train T-LoRA from image' or 'Load T-LoRA'."),
                    *_schedule_inputs()],
            outputs=[io.Model.Output(display_name="MODEL")])

    @classmethod
    @user_errors
    def execute(cls, model, tlora, strength, min_rank, exponent) -> io.NodeOutput:
        patched, _ = apply_tlora(model, tlora, strength, **_overrides(min_rank, exponent))
        return io.NodeOutput(patched)


class TLoraLoad(io.ComfyNode):
    """A T-LoRA file from models/loras -> MODEL with it applied, and the T-LoRA object."""

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="TLoraLoad", display_name="Load T-LoRA", category=CATEGORY,
            description="Loads a T-LoRA file (this pack's format, the reference implementation's SD-XL "
                        "and FLUX files, LyCORIS tlora) and applies it. The input model is not changed.",
            inputs=[io.Model.Input("model", tooltip="The diffusion model to adapt."),
                    io.Combo.Input("tlora_name", options=folder_paths.get_filename_list("loras"),
                                   tooltip="A file under models/loras."),
                    *_schedule_inputs()],
            outputs=[io.Model.Output(display_name="MODEL"), TLoraType.Output(display_name="TLORA")])

    @classmethod
    @user_errors
    def execute(cls, model, tlora_name, strength, min_rank, exponent) -> io.NodeOutput:
        check_overrides(strength, **_overrides(min_rank, exponent))  # before reading: the file is not at fault
        path = folder_paths.get_full_path_or_raise("loras", tlora_name)
        tlora = read_any(path, base_weights=base_weight_lookup(model.model), **_overrides(min_rank, exponent))
        patched, _ = apply_tlora(model, tlora, strength, **_overrides(min_rank, exponent))
        return io.NodeOutput(patched, tlora)


NODES = [TLoraLoad, TLoraApply]

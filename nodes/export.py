"""Node "Export T-LoRA as LoRA": a standard LoRA file for tools that have no T-LoRA support."""
from __future__ import annotations

from pathlib import Path

import folder_paths
from comfy_api.latest import io

from ..tlora_core.export import save_standard_lora
from ..trainer.files import next_free_path
from .common import CATEGORY, TLoraType, user_errors


class TLoraExportLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="TLoraExportLoRA", display_name="Export T-LoRA as LoRA", category=CATEGORY,
            description="Freezes the rank mask of one timestep and writes an ordinary LoRA (lora_up / "
                        "lora_down / alpha) under models/loras, readable by LoraLoader and other tools.",
            inputs=[
                TLoraType.Input("tlora", tooltip="A T-LoRA from the trainer or from Load T-LoRA."),
                io.Int.Input("timestep", default=0, min=0, max=999,
                             tooltip="Whose mask to freeze: 0 = full rank (most detail), 999 = r_min."),
                io.Int.Input("rank", default=0, min=0, max=1024,
                             tooltip="0 = exact (up to 2r components); k > 0 = best rank-k approximation."),
                io.Combo.Input("storage", options=["fp16", "bf16", "fp32"], default="fp16",
                               tooltip="Number format of the file."),
                io.String.Input("filename_prefix", default="tlora/exported",
                                tooltip="Saved as models/loras/<prefix>_NNNNN.safetensors; never overwrites."),
            ],
            outputs=[io.String.Output(display_name="file", tooltip="The saved LoRA, relative to models/loras."),
                     io.String.Output(display_name="report", tooltip="Kept components and relative error.")],
            is_output_node=True)

    @classmethod
    @user_errors
    def execute(cls, tlora, timestep, rank, storage, filename_prefix) -> io.NodeOutput:
        loras_dir = Path(folder_paths.get_folder_paths("loras")[0]).resolve()
        path, report = save_standard_lora(tlora, next_free_path(loras_dir, filename_prefix),
                                          rank=None if rank == 0 else rank, timestep=float(timestep),
                                          storage=storage)
        return io.NodeOutput(path.relative_to(loras_dir).as_posix(), report.summary())


NODES = [TLoraExportLoRA]

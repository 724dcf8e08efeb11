"""The pack's ComfyUI nodes (V3 schema): a thin face over tlora_core and trainer."""
from comfy_api.latest import ComfyExtension, io

from . import apply, evaluate, export, train


class TLoraExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [*train.NODES, *apply.NODES, *export.NODES, *evaluate.NODES]


async def comfy_entrypoint() -> TLoraExtension:
    return TLoraExtension()

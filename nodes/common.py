"""Types and helpers shared by the pack's nodes."""
import functools

from comfy_api.latest import io

from ..tlora_core.errors import TLoraError

# The in-memory T-LoRA (tlora_core.format.TLora) passed between nodes.
TLoraType = io.Custom("TLORA")

CATEGORY = "T-LoRA"


def user_errors(execute):
    """Wraps a node's execute: the pack's own errors (the user's to fix, their message says how) reach
    ComfyUI without the pack's inner frames or chained causes, so the UI's report and the server log hold
    the one message; any other exception keeps its full traceback."""
    @functools.wraps(execute)
    def run(cls, *args, **kwargs):
        try:
            return execute(cls, *args, **kwargs)
        except TLoraError as exc:
            raise exc.with_traceback(None) from None
    return run

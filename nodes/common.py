"""Types shared by the pack's nodes."""
from comfy_api.latest import io

# The in-memory T-LoRA (tlora_core.format.TLora) passed between nodes.
TLoraType = io.Custom("TLORA")

CATEGORY = "T-LoRA"

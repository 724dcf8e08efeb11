"""ComfyUI-facing machinery built on tlora_core: applying a T-LoRA to a ModelPatcher, and training one."""

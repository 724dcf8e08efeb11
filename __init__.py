"""T-LoRA for ComfyUI: train a T-LoRA from one image inside the graph and sample with it.

ComfyUI imports this file and calls `comfy_entrypoint` (V3 node schema). Outside ComfyUI (tests,
kohya sd-scripts, tools) the pure `tlora_core` package is used directly and nothing here runs.
"""
try:
    from comfy_api.latest import ComfyExtension  # noqa: F401  (present inside ComfyUI only)
except ImportError:
    comfy_entrypoint = None
else:
    if __package__:
        from .nodes import comfy_entrypoint  # noqa: F401
    else:  # this file alone, not as a package: pytest imports it so when the checkout's folder name
        comfy_entrypoint = None  # is no Python identifier (a package-level setup_module lookup)

"""T-LoRA core: pure torch + safetensors, no ComfyUI import.

schedule (r(t) of Sec. 3.2, sigma -> t), init (Ortho-LoRA, Sec. 3.3), adapter (Eq. 3, 5, 6), hooks (the
per-call masks and forward-hook body every runtime shares), config, format (the file),
readers of other implementations' files, export to standard LoRA.
"""

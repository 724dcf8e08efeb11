"""T-LoRA core: pure torch + safetensors, no ComfyUI import.

schedule (Eq. 5 and sigma -> t), init (Ortho-LoRA), adapter (Eq. 6), config, format (the file),
readers of other implementations' files, export to standard LoRA.
"""

"""The pack's own error types: every failure a user can cause ends up as one of these.

Messages name the bad value, the key or the file, and the fix, so a ComfyUI user can act on the
text shown in the UI without reading a traceback.
"""


class TLoraError(ValueError):
    """Base class for every error this pack raises on purpose."""


class TLoraConfigError(TLoraError):
    """A setting is out of range or inconsistent (rank, r_min, variant, ...)."""


class TLoraFormatError(TLoraError):
    """A file cannot be read as a T-LoRA: not safetensors, corrupt, unknown format or version."""


class TLoraSaveError(TLoraError, OSError):
    """A file could not be written (disk full, no permission, ...). Nothing was written under its name and
    every file that was there before is untouched. Also an OSError, so callers that handle I/O errors keep working."""

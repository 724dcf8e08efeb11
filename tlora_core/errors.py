"""The pack's own error types: every failure a user can cause ends up as one of these.

Messages name the bad value, the key or the file, and the fix, so a ComfyUI user can act on the
text shown in the UI without reading a traceback.
"""


class TLoraError(ValueError):
    """Base class for every error this pack raises on purpose.

    ComfyUI reports an exception type as `<module>.<class>` unless its module is `builtins`, and a custom
    node's module name is the path of its folder; so these classes name `builtins` as their module, and the
    UI reads "TLoraConfigError", not "/home/.../custom_nodes/comfyui-tlora.tlora_core.errors.TLoraConfigError".
    """

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.__module__ = "builtins"


TLoraError.__module__ = "builtins"


class TLoraConfigError(TLoraError):
    """A setting is out of range or inconsistent (rank, r_min, variant, ...)."""


class TLoraFormatError(TLoraError):
    """A file cannot be read as a T-LoRA: not safetensors, corrupt, unknown format or version."""


class TLoraSaveError(TLoraError, OSError):
    """A file could not be written (disk full, no permission, ...). Nothing was written under its name and
    every file that was there before is untouched. Also an OSError, so callers that handle I/O errors keep working."""

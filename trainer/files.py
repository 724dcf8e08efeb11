"""Where trained T-LoRAs go: validated names under models/loras, never overwriting anything."""
from __future__ import annotations

import os
import re
from pathlib import Path

from ..tlora_core.errors import TLoraError

_BAD_CHARS = re.compile(r'[<>:"|?*\x00-\x1f\\]')
# names Windows refuses for a file or folder, with or without an extension
_RESERVED = re.compile(r"^(con|prn|aux|nul|com[0-9¹²³]|lpt[0-9¹²³])(\..*)?$", re.IGNORECASE)
MAX_PART_BYTES = 200  # file systems allow 255 bytes per name; the rest is room for _<tag>_NNNNN.safetensors
MAX_PREFIX_BYTES = 1000  # whole paths are limited too (4096 bytes on Linux, less elsewhere)
STATE_SUFFIX = ".state"  # not a model extension, so ComfyUI's file lists never show the sidecar


def state_path(path: str | Path) -> Path:
    """The resume-state sidecar of a T-LoRA file: `<name>.safetensors.state` beside it."""
    path = Path(path)
    return path.with_name(path.name + STATE_SUFFIX)


def _short(prefix: str) -> str:
    """The prefix for a message: its start only when it is long."""
    return repr(prefix) if len(prefix) <= 60 else repr(prefix[:60]) + "..."


def safe_prefix(prefix: str) -> str:
    """A relative name (sub folders allowed) that cannot leave the output folder or upset the OS."""
    cleaned = prefix.strip()
    if not cleaned:
        raise TLoraError("the file name prefix is empty; give a name such as 'tlora/my_dog'.")
    if os.path.isabs(cleaned) or cleaned.startswith(("/", "~")) or re.match(r"^[A-Za-z]:", cleaned):
        raise TLoraError(f"file name prefix {prefix!r} is an absolute path; give a name relative to models/loras.")
    parts = cleaned.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise TLoraError(f"file name prefix {prefix!r} contains '..', '.' or an empty folder name; "
                         f"files are only written inside models/loras.")
    if _BAD_CHARS.search(cleaned):
        raise TLoraError(f"file name prefix {prefix!r} contains characters that file systems refuse "
                         f"(< > : \" | ? * \\ or control characters).")
    for part in parts:
        try:
            size = len(part.encode("utf-8"))
        except UnicodeEncodeError:
            raise TLoraError(f"file name prefix {prefix!r} contains characters that cannot be stored in a file "
                             f"name (unpaired surrogates); retype it.") from None
        if size > MAX_PART_BYTES:
            raise TLoraError(f"file name prefix {prefix!r}: a name is {size} bytes long; keep each folder or file "
                             f"name under {MAX_PART_BYTES} bytes.")
    total = len(cleaned.encode("utf-8"))
    if total > MAX_PREFIX_BYTES:
        raise TLoraError(f"file name prefix {_short(cleaned)} is {total} bytes long; keep the whole prefix, folders "
                         f"included, under {MAX_PREFIX_BYTES} bytes.")
    for folder in parts[:-1]:  # the last part only starts a file name (<prefix>_NNNNN.safetensors)
        if _RESERVED.match(folder) or folder[-1] in ". ":
            raise TLoraError(f"file name prefix {prefix!r}: folder name {folder!r} is refused by Windows (a device "
                             f"name such as CON or NUL, or a name ending with a dot or a space).")
    return cleaned


def next_free_path(folder: str | Path, prefix: str, tag: str = "") -> Path:
    """<folder>/<prefix>_<tag>_<NNNNN>.safetensors with the first counter that is not taken."""
    folder = Path(folder).resolve()
    base = folder / safe_prefix(prefix)
    try:
        if folder not in base.resolve().parents:
            raise TLoraError(f"file name prefix {prefix!r} would write outside {folder}.")
        stem = f"{base.name}_{tag}" if tag else base.name
        for counter in range(1, 100000):
            candidate = base.parent / f"{stem}_{counter:05}.safetensors"
            # a sidecar left without its file (a crash between the two writes) keeps its number taken
            if not candidate.exists() and not state_path(candidate).exists():
                return candidate
    except OSError as exc:  # e.g. ENAMETOOLONG: the folder path plus the prefix is too long for the OS
        raise TLoraError(f"file name prefix {_short(prefix)} gives a path under {folder} that the file system "
                         f"refuses ({exc.strerror or exc}); choose a shorter prefix.") from None
    raise TLoraError(f"no free file name for {base}; choose another prefix.")

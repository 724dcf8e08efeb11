"""Where trained T-LoRAs go: validated names under models/loras, never overwriting anything."""
from __future__ import annotations

import os
import re
from pathlib import Path

from ..tlora_core.errors import TLoraError

_BAD_CHARS = re.compile(r'[<>:"|?*\x00-\x1f\\]')


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
    return cleaned


def next_free_path(folder: str | Path, prefix: str, tag: str = "") -> Path:
    """<folder>/<prefix>_<tag>_<NNNNN>.safetensors with the first counter that is not taken."""
    folder = Path(folder).resolve()
    base = folder / safe_prefix(prefix)
    if folder not in base.resolve().parents:
        raise TLoraError(f"file name prefix {prefix!r} would write outside {folder}.")
    stem = f"{base.name}_{tag}" if tag else base.name
    for counter in range(1, 100000):
        candidate = base.parent / f"{stem}_{counter:05}.safetensors"
        if not candidate.exists():
            return candidate
    raise TLoraError(f"no free file name for {base}; choose another prefix.")

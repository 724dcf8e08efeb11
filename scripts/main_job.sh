#!/usr/bin/env bash
# The main job: train a T-LoRA from one image in a real ComfyUI, headless, then sample with it.
#
#   bash scripts/main_job.sh                                   # tiny built-in model + generated image
#   bash scripts/main_job.sh --checkpoint ~/models/sd_xl_base_1.0.safetensors --image ~/dog.jpg
#   bash scripts/main_job.sh --comfyui ~/ComfyUI --checkpoint ... --image ... --steps 400
#   bash scripts/main_job.sh --help                            # every option
#
# Prepares .venv/ and .deps/ComfyUI with scripts/setup_env.sh (idempotent, quick once done), then runs
# scripts/main_job.py, which starts ComfyUI on 127.0.0.1, runs workflows/api/train_and_sample.api.json,
# prints progress and where the T-LoRA file and images went, and stops the server.
# Env: TLORA_SKIP_SETUP=1 skips scripts/setup_env.sh (use an environment you prepared yourself).
set -euo pipefail
cd "$(dirname "$0")/.."

for arg in "$@"; do
    if [[ "$arg" == "-h" || "$arg" == "--help" ]]; then
        exec "$( [[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3 )" scripts/main_job.py --help
    fi
done

if [[ -z "${TLORA_SKIP_SETUP:-}" ]]; then
    bash scripts/setup_env.sh
fi
exec .venv/bin/python scripts/main_job.py "$@"

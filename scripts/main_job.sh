#!/usr/bin/env bash
# The main job: train a T-LoRA from one image in a real ComfyUI, headless, then sample with it.
#
#   bash scripts/main_job.sh                                   # tiny built-in model + generated image
#   bash scripts/main_job.sh --checkpoint ~/models/sd_xl_base_1.0.safetensors --image ~/dog.jpg
#   bash scripts/main_job.sh --comfyui ~/ComfyUI --checkpoint ... --image ... --steps 400
#   bash scripts/main_job.sh --help                            # every option
#
# Checks the arguments first (a mistake costs a second, not a set-up or a training run), prepares .venv/
# and .deps/ComfyUI with `scripts/setup_env.sh --runtime` (idempotent, quick once done), then runs
# scripts/main_job.py, which starts ComfyUI on 127.0.0.1, runs workflows/api/train_and_sample.api.json,
# prints progress and where the T-LoRA file and images went, and stops the server.
# Env: TLORA_SKIP_SETUP=1 skips scripts/setup_env.sh (use an environment you prepared yourself).
set -euo pipefail
cd "$(dirname "$0")/.."

# Help and the argument checks need only the standard library: they run before the set-up, in seconds.
python="$( [[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3 )"
for arg in "$@"; do
    if [[ "$arg" == "-h" || "$arg" == "--help" ]]; then
        exec "$python" scripts/main_job.py --help
    fi
done
"$python" scripts/main_job.py --check-only "$@"

if [[ -z "${TLORA_SKIP_SETUP:-}" ]]; then
    bash scripts/setup_env.sh --runtime  # torch and ComfyUI's requirements only; scripts/test.sh adds the test tools
fi
exec .venv/bin/python scripts/main_job.py "$@"

#!/usr/bin/env bash
# The benchmarks to run when a GPU is lent (about 8 minutes on one H100/H200-class card, plus the family table
# last: six processes that each build a model at real widths, not yet timed on a GPU), one after the other,
# each one's output kept under $OUT (default benchmarks/gpu_out), then one summary of their ratio lines.
#
#   bash benchmarks/gpu_suite.sh              # on the GPU machine, from the repository root
#   bash benchmarks/gpu_suite.sh --dry-run    # anywhere: print the plan and check that every script
#                                             # exists and accepts every flag used (each script's --help)
#
# Env: PY (default .venv/bin/python), PY_UPSTREAM (the 0.33 host's python, for the dynamic-VRAM check;
# default .deps/venv-0.33.0/bin/python), TLORA_COMFYUI_UPSTREAM (its ComfyUI tree), OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
PY_UPSTREAM="${PY_UPSTREAM:-.deps/venv-0.33.0/bin/python}"
OUT="${OUT:-benchmarks/gpu_out}"

# name | python | script and flags
PLAN=(
  "flux_1024px|$PY|benchmarks/sampling_step.py --model flux --flux-blocks 2,2 --flux-tokens 512 --latent 128 --steps 4 --rounds 2 --memory-steps 2"
  "flux_256px|$PY|benchmarks/sampling_step.py --model flux --flux-blocks 2,2 --flux-tokens 256 --latent 32 --steps 4 --rounds 2 --memory-steps 2"
  "sd15_512px|$PY|benchmarks/sampling_step.py --model sd15 --latent 64 --steps 4 --rounds 2 --memory-steps 2"
  "train_sd15_512px|$PY|benchmarks/train_step.py --trainers peft,lora,tlora --resolution 512 --steps 4 --rounds 2 --memory-steps 2 --no-estimate"
  "memory_estimate|$PY|benchmarks/memory_estimate.py"
  "dynamic_vram|$PY_UPSTREAM|tests/gpu/dynamic_vram_check.py"
  "family_table_1024px|$PY|benchmarks/family_table.py --blocks 1 --rounds 3"
)

dry_run() {
  local failed=0 name py cmd script flag help
  for entry in "${PLAN[@]}"; do
    IFS='|' read -r name py cmd <<<"$entry"
    read -r script _ <<<"$cmd"
    echo "$name: $py $cmd"
    if [[ ! -f "$script" ]]; then
      echo "  missing script $script"; failed=1; continue
    fi
    if [[ "$cmd" != *" --"* ]]; then  # no flags (and maybe no --help): it must at least compile
      "$PY" -m py_compile "$script" || failed=1
      continue
    fi
    help="$("$PY" "$script" --help 2>&1)" || { echo "  $script --help failed:"; echo "$help" | tail -3; failed=1; continue; }
    for flag in $(grep -o -- '--[a-z][a-z-]*' <<<"$cmd"); do
      grep -q -- "$flag" <<<"$help" || { echo "  $script does not accept $flag"; failed=1; }
    done
  done
  return $failed
}

if [[ "${1:-}" == "--dry-run" ]]; then
  dry_run && echo "gpu_suite: dry run ok (${#PLAN[@]} steps)"
  exit $?
fi

command -v nvidia-smi >/dev/null || { echo "gpu_suite: no nvidia-smi here; use --dry-run on a CPU machine" >&2; exit 3; }
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
status=0
for entry in "${PLAN[@]}"; do
  IFS='|' read -r name py cmd <<<"$entry"
  echo "== $name: $py $cmd"
  start=$SECONDS
  # shellcheck disable=SC2086
  TLORA_COMFYUI_DIR="$([[ $name == dynamic_vram ]] && echo "${TLORA_COMFYUI_UPSTREAM:-}")" \
    "$py" $cmd >"$OUT/$name.txt" 2>&1 || { echo "   exit $? (see $OUT/$name.txt)"; status=1; }
  echo "   $((SECONDS - start)) s"
done
echo
echo "== summary (ratios, peaks, checks)"
grep -h -E "^(time|memory|T-LoRA|standard|sampling|device|.*check|.*ok|FAIL|\| )" "$OUT"/*.txt | sed 's/^/  /'
exit $status

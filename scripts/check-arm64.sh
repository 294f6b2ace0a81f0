#!/usr/bin/env bash
# Check the hydra-edge runtime on aarch64, emulated on an x86-64 Debian machine.
#
# 1. This machine's Python (with torch) exports a tiny float32 and int8 bundle
#    and records their logits: scripts/arm64_check.py reference.
# 2. An aarch64 Python is prepared: the first stage of debootstrap builds a
#    Debian arm64 root file system, and the host pip installs the aarch64
#    wheels of the runtime's packages, pinned to the host's versions.
# 3. qemu-aarch64-static runs scripts/arm64_check.py check with that Python
#    and compares against step 1 (limits and figures are in that file).
#
# The root file system and the installed wheels are cached between runs, keyed
# by Debian release and package versions. The bundles live in a temporary
# folder that is removed on exit. Steps 1 and 2 run at the same time.
#
# Environment:
#   HYDRA_EDGE_PYTHON         host Python that imports torch and onnx (default: python3)
#   HYDRA_EDGE_ARM64_CACHE    cache folder (default: /var/cache/hydra-edge-arm64 for root,
#                             otherwise ${XDG_CACHE_HOME:-~/.cache}/hydra-edge-arm64)
#   HYDRA_EDGE_DEBIAN_MIRROR  Debian mirror URL (default: the first one in the apt sources
#                             that serves this machine's release)
#   HYDRA_EDGE_SKIP_ARM64=1   exit 0 instead of 3 when emulation cannot be set up
#
# Exit status: 0 when every check passed, 1 when a check or a step failed,
# 3 when emulation cannot be set up here (the message gives the cause).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
HOST_PYTHON=${HYDRA_EDGE_PYTHON:-python3}
# The guest CPU model, and the one described in the guest's /proc/cpuinfo.
QEMU_CPU_MODEL=neoverse-n1
# Wheel platform tags for the guest. Some packages ship only the older tag.
WHEEL_PLATFORMS=(--platform manylinux_2_28_aarch64 --platform manylinux2014_aarch64)
RUNTIME_PACKAGES=(numpy onnxruntime tokenizers psutil)
STEP_TIMEOUT_SECONDS=900

log() { printf 'check-arm64: %s\n' "$*"; }

fail() {
    log "error: $*" >&2
    exit 1
}

# Report why emulation cannot be set up here, and exit 3 unless the caller
# chose to skip the check.
unavailable() {
    log "cannot set up aarch64 emulation: $*" >&2
    if [[ ${HYDRA_EDGE_SKIP_ARM64:-} == 1 ]]; then
        log "ARM check skipped because HYDRA_EDGE_SKIP_ARM64=1"
        exit 0
    fi
    log "fix the cause above, or set HYDRA_EDGE_SKIP_ARM64=1 to skip the ARM check" >&2
    exit 3
}

# Print the last lines of a step's log after it failed.
show_log() {
    log "last lines of $(basename "$1"):" >&2
    tail -n 25 "$1" >&2 || true
}

WORK=""
REFERENCE_PID=""
BUILD_DIRS=()

cleanup() {
    if [[ -n $REFERENCE_PID ]] && kill -0 "$REFERENCE_PID" 2>/dev/null; then
        kill "$REFERENCE_PID" 2>/dev/null || true
        wait "$REFERENCE_PID" 2>/dev/null || true
    fi
    local dir
    for dir in "${BUILD_DIRS[@]}"; do
        rm -rf -- "$dir"
    done
    if [[ -n $WORK ]]; then
        rm -rf -- "$WORK"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# -- what this machine can do ------------------------------------------------

check_machine() {
    local machine
    machine=$(uname -m)
    if [[ $machine != x86_64 ]]; then
        unavailable "this script emulates aarch64 on x86-64, but this machine is $machine; on an ARM board run 'python scripts/arm64_check.py check DIR' as the README describes"
    fi
    if [[ ! -r /etc/os-release ]]; then
        unavailable "/etc/os-release not found; this script needs a Debian machine"
    fi
    # shellcheck disable=SC1091
    DEBIAN_RELEASE=$(. /etc/os-release && [[ ${ID:-} == debian ]] && echo "${VERSION_CODENAME:-}") || true
    if [[ -z $DEBIAN_RELEASE ]]; then
        unavailable "this machine is not Debian with a release code name in /etc/os-release; the arm64 root file system is built from the same Debian release's packages"
    fi
}

check_host_python() {
    if ! command -v "$HOST_PYTHON" >/dev/null; then
        fail "host Python '$HOST_PYTHON' not found or not executable; activate the project's virtual environment or set HYDRA_EDGE_PYTHON"
    fi
    if ! "$HOST_PYTHON" -c 'import torch, onnx, numpy, onnxruntime, tokenizers, psutil' 2>/dev/null; then
        fail "$HOST_PYTHON cannot import torch, onnx, numpy, onnxruntime, tokenizers and psutil; install hydra-edge with its train extra or set HYDRA_EDGE_PYTHON"
    fi
}

# Install qemu-user-static and debootstrap with apt-get when they are missing.
install_tools() {
    local missing=()
    command -v qemu-aarch64-static >/dev/null || missing+=(qemu-user-static)
    command -v debootstrap >/dev/null || missing+=(debootstrap)
    command -v dpkg-deb >/dev/null || missing+=(dpkg)
    if ((${#missing[@]} == 0)); then
        return
    fi
    if [[ $(id -u) != 0 ]]; then
        unavailable "missing Debian packages: ${missing[*]}; installing them needs root: run 'apt-get install --no-install-recommends ${missing[*]}' as root"
    fi
    if ! command -v apt-get >/dev/null; then
        unavailable "missing Debian packages: ${missing[*]}; apt-get not found to install them"
    fi
    log "installing ${missing[*]} with apt-get"
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"; } \
        >"$WORK/apt-get.log" 2>&1; then
        show_log "$WORK/apt-get.log"
        unavailable "apt-get could not install ${missing[*]}"
    fi
    command -v qemu-aarch64-static >/dev/null || unavailable "qemu-user-static is installed but qemu-aarch64-static is not on PATH"
}

# Print the first deb URI in the apt sources whose suites include $1, in
# either the deb822 (.sources) or the one-line (.list) format.
find_debian_mirror() {
    local release=$1 mirror="" files=()
    shopt -s nullglob
    files=(/etc/apt/sources.list.d/*.sources)
    if ((${#files[@]})); then
        mirror=$(awk -v release="$release" '
            function check_stanza() {
                if (!found && types ~ /(^|[[:space:]])deb([[:space:]]|$)/ && (" " suites " ") ~ ("[[:space:]]" release "[[:space:]]") && uris != "") {
                    split(uris, list, /[[:space:]]+/)
                    print list[1]
                    found = 1
                }
                types = ""; suites = ""; uris = ""
            }
            FNR == 1 { check_stanza() }
            /^[[:space:]]*$/ { check_stanza(); next }
            /^Types:/ { sub(/^Types:[[:space:]]*/, ""); types = $0 }
            /^URIs:/ { sub(/^URIs:[[:space:]]*/, ""); uris = $0 }
            /^Suites:/ { sub(/^Suites:[[:space:]]*/, ""); suites = $0 }
            END { check_stanza() }
        ' "${files[@]}")
    fi
    if [[ -z $mirror ]]; then
        files=(/etc/apt/sources.list /etc/apt/sources.list.d/*.list)
        [[ -f ${files[0]} ]] || files=("${files[@]:1}")
        if ((${#files[@]})); then
            mirror=$(awk -v release="$release" '
                $1 == "deb" {
                    i = 2
                    if ($i ~ /^\[/) { while (i < NF && $i !~ /\]$/) i++; i++ }
                    if ($(i + 1) == release) { print $i; exit }
                }
            ' "${files[@]}")
        fi
    fi
    shopt -u nullglob
    echo "$mirror"
}

# -- the cached arm64 root file system and packages --------------------------

open_cache() {
    if [[ -n ${HYDRA_EDGE_ARM64_CACHE:-} ]]; then
        CACHE=$HYDRA_EDGE_ARM64_CACHE
    elif [[ $(id -u) == 0 ]]; then
        CACHE=/var/cache/hydra-edge-arm64
    else
        CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/hydra-edge-arm64
    fi
    mkdir -p "$CACHE" || unavailable "cannot create the cache folder $CACHE; set HYDRA_EDGE_ARM64_CACHE"
    CACHE=$(cd "$CACHE" && pwd -P)
    # Runs that share a cache take turns, because builds rename folders into
    # place and a run may rewrite the guest's /proc/cpuinfo.
    # A user who did not build the cache may lock it through a read-only file.
    [[ -e $CACHE/lock ]] || : 2>/dev/null >"$CACHE/lock" || true
    exec 9<"$CACHE/lock" || unavailable "cannot open $CACHE/lock; set HYDRA_EDGE_ARM64_CACHE to a folder you can write"
    if command -v flock >/dev/null && ! flock -w "$STEP_TIMEOUT_SECONDS" 9; then
        fail "another check has held $CACHE/lock for $STEP_TIMEOUT_SECONDS s; wait for it or remove the lock file"
    fi
    ROOT=$CACHE/debian-$DEBIAN_RELEASE-arm64
}

build_root() {
    if [[ -x $ROOT/usr/bin/python3 ]]; then
        log "arm64 root file system: $ROOT (cached)"
        return
    fi
    local mirror=${HYDRA_EDGE_DEBIAN_MIRROR:-}
    if [[ -z $mirror ]]; then
        mirror=$(find_debian_mirror "$DEBIAN_RELEASE")
    fi
    if [[ -z $mirror ]]; then
        unavailable "no deb source for '$DEBIAN_RELEASE' in /etc/apt/sources.list or /etc/apt/sources.list.d; set HYDRA_EDGE_DEBIAN_MIRROR to a Debian mirror URL"
    fi

    local build=$CACHE/.build-root.$$
    BUILD_DIRS+=("$build")
    log "building a Debian $DEBIAN_RELEASE arm64 root file system from $mirror (first run with this cache only)"
    # With --foreign, debootstrap runs only its first stage, which runs no
    # arm64 code. It downloads the packages and unpacks the few that the
    # second stage would need.
    if ! debootstrap --arch=arm64 --foreign --variant=minbase --include=python3 \
        "$DEBIAN_RELEASE" "$build" "$mirror" >"$WORK/debootstrap.log" 2>&1; then
        show_log "$WORK/debootstrap.log"
        unavailable "debootstrap could not download Debian $DEBIAN_RELEASE arm64 from $mirror"
    fi

    # The second stage would unpack the rest by running arm64 dpkg in a chroot.
    # Unpacking the package files directly gives the same files without
    # running any maintainer script, which the check does not need.
    local name deb
    # debootstrap/base lists the package names separated by spaces.
    # shellcheck disable=SC2013
    for name in $(cat "$build/debootstrap/base"); do
        deb=$(awk -v name="$name" '$1 == name { print $2; exit }' "$build/debootstrap/debpaths")
        [[ -n $deb ]] || fail "debootstrap listed $name but downloaded no package file for it"
        # Without --keep-directory-symlink, tar replaces the merged-/usr links
        # (bin, lib, sbin) with folders.
        dpkg-deb --fsys-tarfile "$build$deb" | tar -C "$build" --keep-directory-symlink -xf - \
            || fail "could not unpack $build$deb"
    done
    rm -rf -- "$build/debootstrap" "$build"/var/cache/apt/archives/*.deb
    [[ -x $build/usr/bin/python3 ]] || fail "the arm64 root file system has no usr/bin/python3 after unpacking"

    # A plain folder, so that the guest reads the cpuinfo file written below.
    rm -rf -- "$build/proc"
    mkdir "$build/proc"
    mv -T -- "$build" "$ROOT"
    log "arm64 root file system ready: $ROOT ($(du -sh "$ROOT" | cut -f1))"
}

# onnxruntime's CPU detection reads /proc/cpuinfo, and with the host's x86-64
# file `import onnxruntime` segfaults (onnxruntime 1.32.0, qemu 7.2). The guest
# gets one Neoverse-N1 entry, the CPU of QEMU_CPU_MODEL, per CPU of this machine.
write_cpuinfo() {
    local ranges range first last cpu content
    IFS=, read -ra ranges </sys/devices/system/cpu/possible
    content=$(for range in "${ranges[@]}"; do
        first=${range%-*}
        last=${range#*-}
        for ((cpu = first; cpu <= last; cpu++)); do
            printf '%s\n' \
                "processor	: $cpu" \
                "BogoMIPS	: 50.00" \
                "Features	: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp ssbs" \
                "CPU implementer	: 0x41" \
                "CPU architecture: 8" \
                "CPU variant	: 0x3" \
                "CPU part	: 0xd0c" \
                "CPU revision	: 1" \
                ""
        done
    done)
    if [[ ! -f $ROOT/proc/cpuinfo || $(<"$ROOT/proc/cpuinfo") != "$content" ]]; then
        printf '%s\n\n' "$content" >"$ROOT/proc/cpuinfo" \
            || unavailable "cannot write $ROOT/proc/cpuinfo for this machine's CPU count; run once as the user who owns $CACHE"
    fi
}

guest_python_version() {
    local binary
    binary=$(readlink "$ROOT/usr/bin/python3")
    [[ $binary =~ ^python([0-9]+\.[0-9]+)$ ]] || fail "cannot tell the Python version of $ROOT/usr/bin/python3 (it links to '$binary')"
    echo "${BASH_REMATCH[1]}"
}

# Install the aarch64 wheels of the runtime's packages, at the host's versions,
# into a cached site folder.
build_site() {
    local python_version pins=() key="" package version
    python_version=$(guest_python_version)
    for package in "${RUNTIME_PACKAGES[@]}"; do
        version=$("$HOST_PYTHON" -c 'import sys; from importlib.metadata import version; print(version(sys.argv[1]))' "$package")
        pins+=("$package==$version")
        key+="-$package$version"
    done
    SITE=$CACHE/site-cp${python_version/./}$key
    if [[ -d $SITE ]]; then
        log "aarch64 packages: ${pins[*]} for Python $python_version (cached)"
        return
    fi

    local build=$CACHE/.build-site.$$ wheels=$WORK/wheels
    local wheel_flags=(--only-binary=:all: "${WHEEL_PLATFORMS[@]}" --python-version "$python_version" --implementation cp)
    BUILD_DIRS+=("$build")
    log "downloading aarch64 wheels: ${pins[*]} for Python $python_version"
    if ! "$HOST_PYTHON" -m pip download --no-input --disable-pip-version-check "${wheel_flags[@]}" -d "$wheels" "${pins[@]}" \
        >"$WORK/pip-download.log" 2>&1; then
        show_log "$WORK/pip-download.log"
        unavailable "pip could not download aarch64 wheels of ${pins[*]} for Python $python_version"
    fi
    if ! "$HOST_PYTHON" -m pip install --no-input --disable-pip-version-check --no-deps --no-index "${wheel_flags[@]}" \
        --target "$build" "$wheels"/*.whl >"$WORK/pip-install.log" 2>&1; then
        show_log "$WORK/pip-install.log"
        fail "pip could not install the aarch64 wheels into $build"
    fi
    mv -T -- "$build" "$SITE"
    # Site folders of other versions are no longer used by this checkout.
    local old
    for old in "$CACHE"/site-*; do
        [[ $old == "$SITE" ]] || rm -rf -- "$old"
    done
    log "aarch64 packages ready: $SITE ($(du -sh "$SITE" | cut -f1))"
}

# -- the check ---------------------------------------------------------------

start_reference() {
    log "exporting the bundles and recording reference results with $HOST_PYTHON (x86-64)"
    PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH} timeout "$STEP_TIMEOUT_SECONDS" \
        "$HOST_PYTHON" "$REPO/scripts/arm64_check.py" reference "$WORK/run" >"$WORK/reference.log" 2>&1 &
    REFERENCE_PID=$!
    REFERENCE_START=$SECONDS
}

finish_reference() {
    local status=0
    wait "$REFERENCE_PID" || status=$?
    REFERENCE_PID=""
    if ((status != 0)); then
        show_log "$WORK/reference.log"
        fail "the x86-64 reference step failed with exit status $status"
    fi
    grep '^reference:' "$WORK/reference.log" || true
    log "reference step finished $((SECONDS - REFERENCE_START)) s after it started"
}

run_guest_check() {
    # With QEMU_LD_PREFIX, a path that exists inside the root file system
    # shadows the host's, so every file that the guest reads must be at a
    # path that the root file system does not have.
    local path
    for path in "$REPO" "$WORK" "$SITE"; do
        if [[ -e $ROOT$path ]]; then
            fail "$path also exists inside $ROOT, so the emulated Python would read that copy; move it, or set TMPDIR or HYDRA_EDGE_ARM64_CACHE"
        fi
    done

    log "running the check on emulated aarch64 (qemu-aarch64-static, CPU $QEMU_CPU_MODEL)"
    local start=$SECONDS status=0
    # OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE, when set, describe the x86-64
    # host and would misconfigure the guest numpy's aarch64 OpenBLAS.
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE -u PYTHONHOME \
        QEMU_LD_PREFIX="$ROOT" QEMU_CPU="$QEMU_CPU_MODEL" \
        PYTHONPATH="$SITE:$REPO" PYTHONNOUSERSITE=1 PYTHONDONTWRITEBYTECODE=1 \
        timeout "$STEP_TIMEOUT_SECONDS" qemu-aarch64-static "$ROOT/usr/bin/python3" \
        "$REPO/scripts/arm64_check.py" check "$WORK/run" || status=$?
    log "aarch64 check finished in $((SECONDS - start)) s"
    case $status in
        0) ;;
        124) fail "the aarch64 check timed out after $STEP_TIMEOUT_SECONDS s" ;;
        1) fail "the aarch64 check failed (see FAIL lines above)" ;;
        *) fail "the emulated Python exited with status $status before the check finished" ;;
    esac
}

main() {
    local start=$SECONDS
    check_machine
    WORK=$(mktemp -d "${TMPDIR:-/tmp}/hydra-edge-arm64.XXXXXX")
    install_tools
    open_cache
    if [[ ! -x $ROOT/usr/bin/python3 && $(id -u) != 0 ]]; then
        unavailable "building the arm64 root file system with debootstrap needs root, and $ROOT does not exist yet"
    fi
    check_host_python

    start_reference
    build_root
    write_cpuinfo
    build_site
    log "emulated aarch64 Python ready after $((SECONDS - start)) s"
    finish_reference
    run_guest_check
    log "ARM check passed in $((SECONDS - start)) s"
}

main "$@"

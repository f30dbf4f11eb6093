#!/usr/bin/env bash
# Set up megatron from nothing: .venv with Python 3.11, torch, mmcv 2.1.0 with its compiled ops,
# mmdet, and this project (editable, with its test extras).
#
# Idempotent: a finished set-up leaves a stamp in .venv; a later run whose stamp still matches
# (same pyproject.toml, same scripts/setup.sh, same Python) and whose venv still imports
# mmdet and mmcv.ops does nothing else and takes a few seconds.
#
# Environment knobs (all optional):
#   MEGATRON_PYTHON       interpreter to build the venv from          (default: python3.11)
#   MEGATRON_WHEEL_CACHE  where a locally built mmcv wheel is kept    (default: ~/.cache/megatron/wheels)
#   MEGATRON_BUILD_JOBS   parallel compile jobs for the mmcv build    (default: number of CPUs)
#   MEGATRON_FORCE_SETUP  set to 1 to ignore the stamp and redo every step
#   PIP_FIND_LINKS        kept as is; ../shared/wheels (when present) and the wheel cache are appended
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"

TORCH_VERSION="2.14.1"
TORCHVISION_VERSION="0.29.1"
MMCV_VERSION="2.1.0"   # mmdet 3.3.0 refuses mmcv >= 2.2.0
PYTHON_REQUIRED="3.11"

PYTHON_BIN="${MEGATRON_PYTHON:-python${PYTHON_REQUIRED}}"
VENV_DIR="$REPO_ROOT/.venv"
VENV_PY="$VENV_DIR/bin/python"
STAMP_FILE="$VENV_DIR/.megatron-setup-stamp"
WHEEL_CACHE="${MEGATRON_WHEEL_CACHE:-$HOME/.cache/megatron/wheels}"
BUILD_JOBS="${MEGATRON_BUILD_JOBS:-$(nproc 2>/dev/null || echo 2)}"
IMPORT_CHECK='import mmdet, mmcv.ops; from mmcv.ops import batched_nms'

log() { printf '\033[1;34m[setup]\033[0m %s\n' "$*"; }
die() { printf '\033[1;31m[setup] ERROR:\033[0m %s\n' "$*" >&2; exit 1; }

# --- Python 3.11 -------------------------------------------------------------------------
command -v "$PYTHON_BIN" >/dev/null 2>&1 || die "'$PYTHON_BIN' was not found on PATH. megatron needs \
Python ${PYTHON_REQUIRED} (mmcv ${MMCV_VERSION}/torch ${TORCH_VERSION} wheels exist for it). Install it \
(e.g. 'apt-get install python${PYTHON_REQUIRED} python${PYTHON_REQUIRED}-venv', or 'pyenv install ${PYTHON_REQUIRED}') \
or point MEGATRON_PYTHON at a Python ${PYTHON_REQUIRED} interpreter, then run this again."
PYTHON_VERSION="$("$PYTHON_BIN" -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])')"
[[ "$PYTHON_VERSION" == "${PYTHON_REQUIRED}."* ]] || die "'$PYTHON_BIN' is Python $PYTHON_VERSION; \
megatron needs Python ${PYTHON_REQUIRED}. Set MEGATRON_PYTHON to a Python ${PYTHON_REQUIRED} interpreter."

# --- fast path: nothing changed since the last finished set-up ---------------------------
compute_stamp() {
    # the stamp covers everything that decides what gets installed
    "$PYTHON_BIN" - "$REPO_ROOT/pyproject.toml" "$REPO_ROOT/scripts/setup.sh" "$PYTHON_VERSION" <<'EOF'
import hashlib, sys
digest = hashlib.sha256()
for path in sys.argv[1:3]:
    with open(path, "rb") as handle:
        digest.update(handle.read())
digest.update(sys.argv[3].encode())
print(digest.hexdigest())
EOF
}
EXPECTED_STAMP="$(compute_stamp)"

if [[ "${MEGATRON_FORCE_SETUP:-0}" != "1" && -x "$VENV_PY" && -f "$STAMP_FILE" \
      && "$(cat "$STAMP_FILE")" == "$EXPECTED_STAMP" ]] \
   && "$VENV_PY" -c "$IMPORT_CHECK" >/dev/null 2>&1; then
    log "environment is up to date ($VENV_DIR); nothing to do"
    exit 0
fi

# Two set-ups at once (e.g. 'make test' in two terminals) would fight over the venv.
mkdir -p "$WHEEL_CACHE"
if command -v flock >/dev/null 2>&1; then
    exec 9>"$WHEEL_CACHE/.setup.lock"
    flock 9
fi

# --- pip find-links: keep what the machine has, add the shared wheels and our cache ------
find_links="${PIP_FIND_LINKS:-}"
if [[ -z "$find_links" ]]; then
    # PIP_FIND_LINKS replaces a find-links from pip's config files, so start from that one
    find_links="$("$PYTHON_BIN" -m pip config get global.find-links 2>/dev/null || true)"
fi
add_find_link() {  # once only: .ci/run may have added the shared wheels already
    case " $find_links " in
        *" $1 "*) ;;
        *) find_links="$find_links $1" ;;
    esac
}
if [[ -d "$REPO_ROOT/../shared/wheels" ]]; then
    add_find_link "$(cd "$REPO_ROOT/../shared/wheels" && pwd)"
fi
add_find_link "$WHEEL_CACHE"
export PIP_FIND_LINKS="${find_links# }"
log "pip find-links: $PIP_FIND_LINKS"

# --- the virtual environment -------------------------------------------------------------
if [[ -x "$VENV_PY" ]]; then
    venv_version="$("$VENV_PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null || echo broken)"
    [[ "$venv_version" == "$PYTHON_REQUIRED" ]] || die "$VENV_DIR holds Python $venv_version, not \
${PYTHON_REQUIRED}. Remove it ('make clean') and run the set-up again."
    log "using the existing virtual environment $VENV_DIR"
else
    log "creating the virtual environment $VENV_DIR (Python $PYTHON_VERSION)"
    "$PYTHON_BIN" -m venv "$VENV_DIR" || die "could not create $VENV_DIR; on Debian/Ubuntu install \
python${PYTHON_REQUIRED}-venv"
fi
PIP=("$VENV_PY" -m pip --disable-pip-version-check)
if [[ -n "${CI:-}" ]]; then
    export PIP_PROGRESS_BAR=off  # progress bars only clutter a CI log
fi

# --- torch -------------------------------------------------------------------------------
log "installing torch==$TORCH_VERSION torchvision==$TORCHVISION_VERSION"
"${PIP[@]}" install -q "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION"

# --- mmcv with compiled ops --------------------------------------------------------------
mmcv_ops_work() { "$VENV_PY" -c 'import mmcv.ops; from mmcv.ops import batched_nms' >/dev/null 2>&1; }

mmcv_installed_version() {
    "$VENV_PY" -c 'import importlib.metadata as m; print(m.version("mmcv"))' 2>/dev/null || true
}

# A wheel of ours fits only the torch it was compiled against; the file name cannot say which,
# so each candidate is installed and kept only if mmcv.ops then imports.
try_mmcv_wheel() {
    local wheel="$1"
    log "trying mmcv wheel $wheel"
    "${PIP[@]}" install -q --no-deps --force-reinstall "$wheel" || return 1
    "${PIP[@]}" install -q "$wheel" || return 1   # mmcv's own dependencies (mmengine, addict, ...)
    if mmcv_ops_work; then
        return 0
    fi
    log "  mmcv.ops does not import with this wheel (built against another torch?); skipping it:"
    "$VENV_PY" -c 'import mmcv.ops' 2>&1 | tail -n 1 | sed 's/^/    /' || true
    return 1
}

build_mmcv_wheel() {
    log "============================================================================================"
    log "No prebuilt mmcv $MMCV_VERSION wheel with compiled ops fits this machine, so it is built from"
    log "the source release now. This takes about 24 minutes on 2 CPU cores (MEGATRON_BUILD_JOBS=$BUILD_JOBS)."
    log "The wheel is kept in $WHEEL_CACHE, so this happens once per machine."
    log "============================================================================================"
    # mmcv's setup.py imports pkg_resources, which setuptools >= 70 no longer ships
    "${PIP[@]}" install -q "setuptools<70" ninja wheel
    local work
    work="$(mktemp -d "${TMPDIR:-/tmp}/megatron-mmcv-build.XXXXXX")"
    # shellcheck disable=SC2064  # expand $work now: the variable is local
    trap "rm -rf '$work'" EXIT
    # --no-build-isolation: preparing the sdist's metadata runs its setup.py, which imports torch
    "${PIP[@]}" download -q "mmcv==$MMCV_VERSION" --no-binary :all: --no-deps --no-build-isolation -d "$work"
    tar -xzf "$work/mmcv-$MMCV_VERSION.tar.gz" -C "$work"
    local src="$work/mmcv-$MMCV_VERSION"
    [[ -f "$src/setup.py" ]] || die "the mmcv $MMCV_VERSION source release has no setup.py at $src"
    # torch 2.14's headers need C++20; the release asks for C++14/17
    sed -i.orig -E 's/-std=c\+\+1[47]/-std=c++20/g' "$src/setup.py"
    grep -q -- '-std=c++20' "$src/setup.py" || die "patching $src/setup.py to -std=c++20 failed \
(no -std=c++14/17 flag found); the mmcv source release changed?"
    # mmcv compiles its CUDA kernels when torch sees a GPU; that needs the CUDA compiler
    local build_env=(MMCV_WITH_OPS=1 MAX_JOBS="$BUILD_JOBS")
    if "$VENV_PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
        if command -v nvcc >/dev/null 2>&1 || [[ -x "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" ]]; then
            log "a GPU and nvcc are present: mmcv's CUDA ops are compiled too (this takes longer)"
        else
            log "WARNING: torch sees a GPU but there is no nvcc (CUDA toolkit), so mmcv is built with CPU"
            log "         ops only. For its CUDA ops: install the CUDA toolkit, delete"
            log "         $WHEEL_CACHE/mmcv-*.whl and run 'make clean setup'."
            build_env+=(CUDA_VISIBLE_DEVICES=)
        fi
    fi
    # -v: pip passes the build output (and any compiler error) through instead of hiding it
    env "${build_env[@]}" "${PIP[@]}" wheel -v --no-build-isolation --no-deps -w "$work/dist" "$src" \
        || die "building mmcv $MMCV_VERSION failed (see the compiler output above); it needs a C++ \
compiler with C++20 support (g++ >= 10) and, when torch sees a GPU, the CUDA toolkit"
    # the old setuptools was for this build only: torch itself requires setuptools >= 77
    "${PIP[@]}" install -q --upgrade setuptools
    local built
    built="$(ls "$work"/dist/mmcv-"$MMCV_VERSION"-*.whl)"
    # move into the cache only when complete, so an interrupted build leaves no broken wheel
    cp "$built" "$WHEEL_CACHE/.partial.whl"
    mv "$WHEEL_CACHE/.partial.whl" "$WHEEL_CACHE/$(basename "$built")"
    rm -rf "$work"
    trap - EXIT
    log "built $WHEEL_CACHE/$(basename "$built")"
}

if [[ "$(mmcv_installed_version)" == "$MMCV_VERSION" ]] && mmcv_ops_work; then
    log "mmcv $MMCV_VERSION with compiled ops is already installed"
else
    py_tag="cp$("$VENV_PY" -c 'import sys; print("%d%d" % sys.version_info[:2])')"
    mmcv_ready=0
    for dir in $PIP_FIND_LINKS; do
        [[ -d "$dir" ]] || continue
        for wheel in "$dir"/mmcv-"$MMCV_VERSION"-"$py_tag"-"$py_tag"-*.whl; do
            [[ -f "$wheel" ]] || continue
            if try_mmcv_wheel "$wheel"; then mmcv_ready=1; break 2; fi
        done
    done
    if [[ "$mmcv_ready" != 1 ]]; then
        build_mmcv_wheel
        wheel="$(ls "$WHEEL_CACHE"/mmcv-"$MMCV_VERSION"-"$py_tag"-"$py_tag"-*.whl | head -n 1)"
        try_mmcv_wheel "$wheel" || die "mmcv.ops does not import even with the freshly built $wheel; \
see the build output above"
    fi
fi

# --- the project ---------------------------------------------------------------------------
log "installing megatron (editable) with its test dependencies"
"${PIP[@]}" install -q -e "$REPO_ROOT[test]"

# --- verify and stamp ------------------------------------------------------------------------
log "checking: $IMPORT_CHECK"
"$VENV_PY" -c "$IMPORT_CHECK" || die "the environment does not import mmdet and mmcv.ops; see above"
[[ "$(mmcv_installed_version)" == "$MMCV_VERSION" ]] || die "pip replaced mmcv $MMCV_VERSION by \
$(mmcv_installed_version); mmdet 3.3.0 needs mmcv $MMCV_VERSION"
# CPU-only mmcv ops (e.g. the shared prebuilt wheel) cannot run nms & co. on CUDA tensors
"$VENV_PY" - "$WHEEL_CACHE" <<'EOF_CUDA' || true
import sys
import torch
from mmcv.ops import get_compiling_cuda_version
if torch.cuda.is_available() and get_compiling_cuda_version() == "not available":
    print("[setup] WARNING: this machine has a GPU but mmcv's ops were compiled without CUDA, so "
          "mmcv ops (nms, roi_align...) on CUDA tensors will fail. To build them with CUDA: install the "
          "CUDA toolkit (nvcc), make sure no CPU-only mmcv wheel lies in the find-links folders or in "
          f"{sys.argv[1]}, and run 'make clean setup'.")
EOF_CUDA
echo "$EXPECTED_STAMP" > "$STAMP_FILE"
log "done: $VENV_DIR is ready ('make run' or 'make test')"

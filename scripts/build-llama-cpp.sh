#!/usr/bin/env bash
# Build the pinned llama.cpp (scripts/llama-cpp.pin) once per machine into a cache
# shared by every checkout, and optionally install the matching Python bindings.
# The Makefile, CI and the Docker image all call this script; nothing else builds
# llama.cpp.
#
#   scripts/build-llama-cpp.sh [--cuda]                build if needed, print the install dir
#   scripts/build-llama-cpp.sh [--cuda] --print-dir    print the install dir, build nothing
#   scripts/build-llama-cpp.sh [--cuda] --bindings PY  build if needed, then install the
#                                                      llama-cpp-python bindings into PY's
#                                                      environment against this build
#
# Environment:
#   AGIASI_CACHE_DIR  cache root (default ${XDG_CACHE_HOME:-$HOME/.cache}/agiasi-soul-fusion)
#   GGML_CUDA=ON      same as --cuda: build the CUDA variant
#   CUDA_DOCKER_ARCH  CUDA architectures for the CUDA variant (e.g. 86;90), passed as
#                     CMAKE_CUDA_ARCHITECTURES; unset or "default" lets CMake choose
#   PYTHON            interpreter whose pip downloads the sdist (default python3)
#
# Install layout, <cache>/llama.cpp/<commit>-<variant>/:
#   .complete    written last; commit, variant, sdist and build date. No marker, no install.
#   src/         the llama.cpp tree: convert_hf_to_gguf.py, conversion/, gguf-py/
#   build/bin/   llama-quantize, llama-imatrix, llama-perplexity, llama-tokenize, llama-server
#                (an OpenAI-compatible server, without its web UI: `pipeline serve --backend` can
#                use it) and the shared libraries libllama.so, libggml*.so (point
#                LLAMA_CPP_LIB_PATH here for the bindings)
#   sdist/       the untouched llama-cpp-python sdist, source of the Python bindings
#
# Progress goes to stderr; the install dir is the only line on stdout.
set -euo pipefail
shopt -s inherit_errexit

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=scripts/llama-cpp.pin
source "$repo_root/scripts/llama-cpp.pin"

log() { printf 'build-llama-cpp: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"; }

variant=cpu
case "${GGML_CUDA:-OFF}" in
  ON | on | On | 1 | TRUE | true | YES | yes) variant=cuda ;;
esac
mode=build
bindings_python=
while (($#)); do
  case "$1" in
    --cuda) variant=cuda ;;
    --print-dir) mode=print ;;
    --bindings)
      (($# >= 2)) || die "--bindings needs a Python interpreter, e.g. --bindings .venv/bin/python"
      mode=bindings
      bindings_python=$2
      shift
      ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
  shift
done

cache_root="${AGIASI_CACHE_DIR:-${XDG_CACHE_HOME:-${HOME:?HOME is not set}/.cache}/agiasi-soul-fusion}"
[[ $cache_root == /* ]] || cache_root="$PWD/$cache_root"
llama_root="$cache_root/llama.cpp"
install_dir="$llama_root/$LLAMA_CPP_COMMIT-$variant"
lib_dir="$install_dir/build/bin"

# Every target the pipeline and the bindings use; libllama pulls in the libggml* it needs.
build_targets=(llama llama-quantize llama-imatrix llama-perplexity llama-tokenize llama-server)
# What a finished install must hold. A cached install from an older version of this
# list lacks something and is rebuilt, so adding a tool here needs no new cache key.
required_files=(llama-quantize llama-imatrix llama-perplexity llama-tokenize llama-server libllama.so libggml.so)

tmp=
cleanup() { if [[ -n $tmp ]]; then rm -rf "$tmp"; fi; }
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

sha256_of() { sha256sum "$1" | cut -d' ' -f1; }

sdist_name="llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION.tar.gz"
sdist="$cache_root/downloads/$sdist_name"

# Fetch the sdist into <cache>/downloads unless a copy with the pinned hash is there.
fetch_sdist() {
  local python="${PYTHON:-python3}"
  if [[ -f $sdist && $(sha256_of "$sdist") == "$LLAMA_CPP_PYTHON_SHA256" ]]; then
    log "using cached $sdist"
    return 0
  fi
  rm -f "$sdist"
  "$python" -m pip --version >/dev/null 2>&1 ||
    die "'$python -m pip' does not work; set PYTHON to an interpreter that has pip"
  log "downloading llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION sdist from PyPI"
  "$python" -m pip download --no-deps --no-binary :all: \
    "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" -d "${sdist%/*}" >&2 ||
    die "pip could not download llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION; offline, place" \
      "$sdist_name (sha256 $LLAMA_CPP_PYTHON_SHA256) at $sdist"
  [[ -f $sdist ]] || die "pip download did not produce $sdist"
  local actual
  actual=$(sha256_of "$sdist")
  if [[ $actual != "$LLAMA_CPP_PYTHON_SHA256" ]]; then
    rm -f "$sdist"
    die "sha256 mismatch for $sdist_name: expected $LLAMA_CPP_PYTHON_SHA256" \
      "(scripts/llama-cpp.pin), got $actual; file removed"
  fi
}

build() {
  fetch_sdist

  # Leftovers of builds that were killed: only lock holders create these.
  rm -rf "$llama_root/.tmp-$LLAMA_CPP_COMMIT-$variant".*
  tmp=$(mktemp -d "$llama_root/.tmp-$LLAMA_CPP_COMMIT-$variant.XXXXXX")
  # mktemp makes the dir 0700; a Docker image that runs as another user must read it.
  chmod 755 "$tmp"

  log "extracting $sdist_name"
  tar -xzf "$sdist" -C "$tmp"
  mv "$tmp/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION" "$tmp/sdist"
  local head_file="$tmp/sdist/.git/modules/vendor/llama.cpp/HEAD"
  [[ -f $head_file ]] || die "the sdist has no $head_file: cannot tell which llama.cpp it vendors"
  local vendored
  vendored=$(<"$head_file")
  [[ $vendored == "$LLAMA_CPP_COMMIT" ]] ||
    die "the sdist vendors llama.cpp $vendored, the pin says $LLAMA_CPP_COMMIT (scripts/llama-cpp.pin)"

  # Build a copy outside the sdist, without the submodule's .git file: in place, CMake
  # sees the sdist's git metadata change on every configure and ninja loops forever.
  cp -a "$tmp/sdist/vendor/llama.cpp" "$tmp/src"
  rm -f "$tmp/src/.git"

  local cmake_args=(
    -S "$tmp/src" -B "$tmp/build"
    -DCMAKE_BUILD_TYPE=Release
    -DBUILD_SHARED_LIBS=ON
    # Portable binaries: a cache or image may move to another CPU.
    -DGGML_NATIVE=OFF
    # Only what we use (tools/ still builds). The tests download models at build time.
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF
    # llama-server, offline: its web UI comes from tools/ui/dist, an npm build
    # (LLAMA_BUILD_UI) or a download from a Hugging Face bucket (LLAMA_USE_PREBUILT_UI,
    # scripts/ui-assets.cmake); with neither, the server embeds an empty asset table and
    # serves its API alone, which is all `pipeline serve` asks of it.
    -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF
    # Our tools never fetch models over HTTPS; this keeps libssl out of the runtime.
    -DLLAMA_OPENSSL=OFF
    # The tree is renamed after the build: binaries must find their libraries via $ORIGIN.
    -DCMAKE_BUILD_RPATH_USE_ORIGIN=ON
    # There is no git metadata any more; keep --version honest.
    "-DLLAMA_BUILD_COMMIT=${LLAMA_CPP_COMMIT:0:7}"
  )
  if command -v ninja >/dev/null 2>&1; then
    cmake_args+=(-G Ninja)
  fi
  if [[ $variant == cuda ]]; then
    cmake_args+=(-DGGML_CUDA=ON)
    if [[ -n ${CUDA_DOCKER_ARCH:-} && ${CUDA_DOCKER_ARCH} != default ]]; then
      cmake_args+=("-DCMAKE_CUDA_ARCHITECTURES=$CUDA_DOCKER_ARCH")
    fi
  fi

  local started=$SECONDS
  log "configuring llama.cpp ${LLAMA_CPP_COMMIT:0:7} ($variant)"
  # The ceiling stops git from finding a repository around the cache (build info).
  GIT_CEILING_DIRECTORIES="$tmp" cmake "${cmake_args[@]}" >&2
  log "building ${build_targets[*]} with $(nproc) jobs"
  cmake --build "$tmp/build" --target "${build_targets[@]}" -j "$(nproc)" >&2
  local f
  for f in "${required_files[@]}"; do
    [[ -e $tmp/build/bin/$f ]] || die "the build finished without build/bin/$f"
  done
  log "built in $((SECONDS - started)) s"

  printf 'commit=%s\nvariant=%s\nsdist=llama-cpp-python==%s\nbuilt=%s\n' \
    "$LLAMA_CPP_COMMIT" "$variant" "$LLAMA_CPP_PYTHON_VERSION" "$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
    >"$tmp/.complete"
  publish
  log "installed $install_dir"
}

# The rename is the commit point: the final path only ever holds a finished tree. A cached
# tree that is replaced (it lacks a tool this script now builds) may be in use by another
# build or test run: it is renamed aside and the new one renamed in, so the path is empty
# for the instant between two renames (not for the length of an rm -rf); the old one is
# removed after.
publish() {
  if [[ -e $install_dir ]]; then
    local old="$llama_root/.tmp-$LLAMA_CPP_COMMIT-$variant.old"
    rm -rf "$old"
    mv -T "$install_dir" "$old"
    mv -T "$tmp" "$install_dir"
    rm -rf "$old"
  else
    mv -T "$tmp" "$install_dir"
  fi
  tmp=
}

# A finished install: the marker, and every required file (an older recipe may lack one).
installed() {
  [[ -f $install_dir/.complete ]] || return 1
  local f
  for f in "${required_files[@]}"; do
    if [[ ! -e $lib_dir/$f ]]; then
      log "the cached build in $install_dir has no build/bin/$f; rebuilding"
      return 1
    fi
  done
}

ensure_built() {
  installed && return 0
  mkdir -p "$llama_root"
  exec 9>"$llama_root/.lock"
  if ! flock -n 9; then
    log "another build holds $llama_root/.lock; waiting for it"
    flock 9
  fi
  # The holder we waited for may have built it.
  installed && return 0
  build
}

bindings_ok() {
  LLAMA_CPP_LIB_PATH="$lib_dir" "$1" -c \
    "import sys, llama_cpp; sys.exit(llama_cpp.__version__ != '$LLAMA_CPP_PYTHON_VERSION')" \
    >/dev/null 2>&1
}

install_bindings() {
  local python=$1
  if bindings_ok "$python"; then
    log "llama-cpp-python $LLAMA_CPP_PYTHON_VERSION already works in $python"
    return 0
  fi
  # pip builds inside the source tree it is given: work on a throwaway copy.
  tmp=$(mktemp -d)
  cp -a "$install_dir/sdist" "$tmp/sdist"
  log "installing llama-cpp-python $LLAMA_CPP_PYTHON_VERSION into $python (no llama.cpp compile)"
  CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" "$python" -m pip install "$tmp/sdist" >&2
  rm -rf "$tmp"
  tmp=
  bindings_ok "$python" ||
    die "llama_cpp does not import in $python with LLAMA_CPP_LIB_PATH=$lib_dir"
}

case $mode in
  print) ;;
  build) ensure_built ;;
  bindings)
    ensure_built
    install_bindings "$bindings_python"
    ;;
esac
printf '%s\n' "$install_dir"

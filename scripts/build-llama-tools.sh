#!/usr/bin/env bash
# Builds llama.cpp's command-line tools llama-quantize, llama-imatrix and llama-perplexity from the llama.cpp
# source vendored in the llama-cpp-python 0.3.36 sdist (the same llama.cpp our tests compare bytes against),
# for bench/gguf_bench.py. Also unpacks llama.cpp's converter convert_hf_to_gguf.py (with its gguf-py) from the
# same sdist, for the speed comparison.
#
#   bash scripts/build-llama-tools.sh          # -> ~/.cache/mergequant/llama-tools/{bin,src}
#
# Output: ~/.cache/mergequant/llama-tools/bin/llama-{quantize,imatrix,perplexity} and
# ~/.cache/mergequant/llama-tools/src/ (the unpacked llama.cpp source; convert_hf_to_gguf.py at its top).
# Cached: a second run checks the binaries and exits at once. cmake flags: -DGGML_NATIVE=OFF (what our
# llama-cpp-python wheel is built with), -DLLAMA_CURL=OFF, Release, only the three targets, -j2 (override with
# JOBS=N). First build: ~10 min on 2 idle cores. Never fatal: prints a warning and exits 0 if it cannot build
# (bench/gguf_bench.py then falls back to llama-cpp-python for perplexity and skips llama.cpp's rows).
set -u
VERSION=0.3.36
ROOT="${MERGEQUANT_LLAMA_TOOLS:-$HOME/.cache/mergequant/llama-tools}"
JOBS="${JOBS:-2}"
TOOLS="llama-quantize llama-imatrix llama-perplexity"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore

warn() { echo "warning: $*; bench/gguf_bench.py will skip llama.cpp's own tools" >&2; exit 0; }

have_all() {
  for t in $TOOLS; do [ -x "$ROOT/bin/$t" ] || return 1; done
  [ -f "$ROOT/src/convert_hf_to_gguf.py" ] || return 1
  return 0
}
if have_all; then
  echo "llama.cpp tools already built in $ROOT/bin ($TOOLS)"
  exit 0
fi
command -v cmake >/dev/null 2>&1 || warn "cmake missing"
command -v g++ >/dev/null 2>&1 || warn "g++ missing"
mkdir -p "$ROOT/dl" "$ROOT/bin" || warn "cannot create $ROOT"

# 1. The sdist (PyPI has only the sdist for 0.3.36, so a plain download fetches it; --no-binary :all: would
#    also build its build dependencies from source): reuse a downloaded copy, else pip download it.
SDIST="$(ls "$ROOT"/dl/llama_cpp_python-$VERSION.tar.gz 2>/dev/null | head -1)"
if [ -z "$SDIST" ]; then
  pip download --no-deps -d "$ROOT/dl" "llama-cpp-python==$VERSION" >&2 \
    || warn "could not download the llama-cpp-python $VERSION sdist"
  SDIST="$(ls "$ROOT"/dl/llama_cpp_python-$VERSION.tar.gz 2>/dev/null | head -1)"
  [ -n "$SDIST" ] || warn "no sdist in $ROOT/dl after pip download"
fi

# 2. Unpack only vendor/llama.cpp into $ROOT/src.
if [ ! -f "$ROOT/src/CMakeLists.txt" ]; then
  rm -rf "$ROOT/src" "$ROOT/unpack" && mkdir -p "$ROOT/unpack" || warn "cannot unpack"
  tar -xzf "$SDIST" -C "$ROOT/unpack" "llama_cpp_python-$VERSION/vendor/llama.cpp" || warn "cannot unpack $SDIST"
  mv "$ROOT/unpack/llama_cpp_python-$VERSION/vendor/llama.cpp" "$ROOT/src" && rm -rf "$ROOT/unpack" \
    || warn "cannot move the llama.cpp source"
fi

# 3. Configure and build only the three tools.
cmake -S "$ROOT/src" -B "$ROOT/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF -DLLAMA_CURL=OFF \
  -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
  -DLLAMA_BUILD_TOOLS=ON >"$ROOT/cmake-configure.log" 2>&1 || warn "cmake configure failed (see $ROOT/cmake-configure.log)"
cmake --build "$ROOT/build" --config Release -j "$JOBS" --target $TOOLS >"$ROOT/cmake-build.log" 2>&1 \
  || warn "cmake build failed (see $ROOT/cmake-build.log)"
for t in $TOOLS; do
  f="$(find "$ROOT/build" -type f -name "$t" -perm -u+x | head -1)"
  [ -n "$f" ] || warn "$t not found after the build"
  cp "$f" "$ROOT/bin/$t" || warn "cannot copy $t"
done
[ -f "$ROOT/src/convert_hf_to_gguf.py" ] || echo "warning: convert_hf_to_gguf.py not in the sdist" >&2
echo "llama.cpp tools built in $ROOT/bin ($TOOLS); converter: $ROOT/src/convert_hf_to_gguf.py"
exit 0

#!/usr/bin/env bash
# Installs the real llama.cpp (through llama-cpp-python 0.3.36, built from source) so the GGUF engine tests
# (tests/test_gguf_llama_cpp.py: byte identity with llama_model_quantize, logits, tokenization) can run. Its
# ctypes API exposes llama_model_quantize (the reference quantizer) and Llama(..., logits_all=True) (the
# reference engine). The build takes ~11 min on 2 idle cores the first time (~50 min on a loaded 2-core
# machine); pip caches the wheel, so later runs install in seconds.
# Never fatal: without it, the llama.cpp tests skip.
set -u
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
if python -c "import llama_cpp, sys; sys.exit(0 if llama_cpp.__version__ == '0.3.36' else 1)" 2>/dev/null; then
  echo "llama-cpp-python 0.3.36 already installed"
  exit 0
fi
if ! command -v cmake >/dev/null 2>&1 || ! command -v g++ >/dev/null 2>&1; then
  echo "warning: cmake or g++ missing; cannot build llama-cpp-python; llama.cpp tests will be skipped" >&2
  exit 0
fi
export CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF}"
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-2}"
if pip install "llama-cpp-python==0.3.36"; then  # PyPI has only the sdist: built here once, then the cached wheel
  if python -c "import llama_cpp" 2>/dev/null; then
    echo "llama.cpp installed (llama-cpp-python 0.3.36, built from source)"
    exit 0
  fi
fi
echo "warning: could not install llama-cpp-python 0.3.36; llama.cpp tests will be skipped" >&2
exit 0

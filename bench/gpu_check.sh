#!/usr/bin/env bash
# The GPU check (issue 16) in one shot: install what is missing, run bench/gpu_check.py, copy the results.
#
#   bash bench/gpu_check.sh --prepare    # on the CPU machine, before a GPU session (needs the package registry):
#                                        # wheels for GPTQModel 7.7 and its stack, and the shared tiny Mixtral,
#                                        # into bench/work/gpu-carry/ (~30 MB; gitignored: pass it as `carry`)
#   bash bench/gpu_check.sh              # on the GPU machine: ~8.5 minutes (driver budget 480 s + installs)
#   bash bench/gpu_check.sh --dry-run    # anywhere: CPU, tiny shapes, same code paths; prints the GPU plan
#
# Any other argument goes to bench/gpu_check.py (see its --help: --skip-gptqmodel, --gptq-cap-s, --phases...).
#
# What it installs, and only when missing (nothing is reinstalled into an environment that already has it):
#   torch      kept when importable (the GPU image ships a CUDA build); else `pip install "torch==2.13.0"`
#              (PyPI's Linux wheel of 2.13 is the CUDA build; the CPU machines pin a local CPU wheel)
#   mergequant the repo itself, first on PYTHONPATH; when a dependency is missing, `pip install -e ".[test]"`
#   gptqmodel  from bench/work/gpu-carry/wheels/ (--no-index --no-deps) when present, else
#              scripts/install-gptq-client.sh (--no-deps, its runtime dependencies listed by hand)
# The GPU machine of this workplace reaches no package registry: --prepare builds what it needs here.
# When $OUT is set (the device tool), the JSON results, the console log and the logs end up there.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
CARRY=bench/work/gpu-carry
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 TOKENIZERS_PARALLELISM=false

prepare() {
  local W=$CARRY/wheels fail=0
  mkdir -p "$W"
  local plat=(--python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
              --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
  # on the registry as wheels (the GPU image runs CPython 3.12 on x86-64)
  for p in optimum==2.3.0 torchao==0.18.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19; do
    $PY -m pip download -q --no-deps --only-binary=:all: "${plat[@]}" -d "$W" "$p" || { echo "could not fetch $p" >&2; fail=1; }
  done
  # published as source only: built here (pure Python)
  for p in gptqmodel==7.7.0 tokenicer==0.0.14 logbar==0.4.15 defuser==0.0.28 device-smi==0.5.7; do
    $PY -m pip wheel -q --no-deps -w "$W" "$p" || $PY -m pip wheel -q --no-deps --no-build-isolation -w "$W" "$p" \
      || { echo "could not build $p" >&2; fail=1; }
  done
  # pypcre has a C extension: built with a CPython 3.12 for the GPU image (links the system's libpcre2-8)
  local py312="" c
  for c in ${PY312:-} $(ls -d /root/.pyenv/versions/3.12*/bin/python 2>/dev/null) python3.12; do
    if "$c" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null; then py312=$c; break; fi
  done
  if [ -n "$py312" ]; then
    "$py312" -m pip wheel -q --no-deps -w "$W" pypcre==0.6.4 || { echo "could not build pypcre" >&2; fail=1; }
  else
    echo "no python3.12 here: pypcre (needed by gptqmodel) cannot be built for the GPU image" >&2; fail=1
  fi
  local moe=""
  for d in ../shared/models/moe-mixtral/base /work/shared/models/moe-mixtral/base shared/models/moe-mixtral/base; do
    [ -f "$d/config.json" ] && { moe=$d; break; }
  done
  if [ -n "$moe" ]; then
    rm -rf "$CARRY/moe-mixtral-base" && cp -r "$moe" "$CARRY/moe-mixtral-base" && chmod -R u+w "$CARRY/moe-mixtral-base"
  else
    echo "shared tiny Mixtral not found: the GPU check will use a random one" >&2
  fi
  ls -la "$W"
  du -sh "$CARRY"
  echo "now: device run, command 'bash bench/gpu_check.sh', carry [\"$CARRY\"], timeout_s 570"
  return $fail
}

if [ "${1:-}" = "--prepare" ]; then
  prepare
  exit $?
fi

DRY=0
for a in "$@"; do [ "$a" = "--dry-run" ] && DRY=1; done
EXTRA=()
T0=$(date +%s)

echo "== environment"
$PY --version
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
if ! $PY -c "import torch" 2>/dev/null; then
  echo "torch missing: pip install torch==2.13.0"
  $PY -m pip install -q "torch==2.13.0" || { echo "error: could not install torch" >&2; exit 2; }
fi
$PY -c "import torch; print('torch', torch.__version__, '| cuda build', torch.version.cuda, '| torch.cuda.is_available():', torch.cuda.is_available())"

export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
DEPS="import mergequant.cli, mergequant.quant.quantize, mergequant.merge.run, numba, typer, transformers, safetensors, yaml, tqdm, huggingface_hub, pytest"
if ! $PY -c "$DEPS" 2>/dev/null; then
  echo "mergequant's dependencies are incomplete: pip install -e .[test]"
  $PY -m pip install -q -e ".[test]" || $PY -m pip install -q --no-deps --no-build-isolation -e . \
    || echo "warning: could not install mergequant; using the repo on PYTHONPATH" >&2
  $PY -c "$DEPS" || { echo "error: mergequant cannot be imported with its dependencies" >&2; exit 2; }
fi
$PY -c "import mergequant, transformers, numba; print('mergequant', mergequant.__version__, 'from', mergequant.__file__, '| transformers', transformers.__version__, '| numba', numba.__version__)"

has_gptqmodel() { $PY -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('gptqmodel') is None)"; }
if [ $DRY = 0 ] && ! has_gptqmodel; then
  if ls "$CARRY"/wheels/*.whl >/dev/null 2>&1; then
    echo "installing GPTQModel from $CARRY/wheels"
    $PY -m pip install -q --no-index --no-deps "$CARRY"/wheels/*.whl || echo "warning: wheel install failed" >&2
  else
    bash scripts/install-gptq-client.sh
  fi
  has_gptqmodel || { echo "warning: no gptqmodel: GPTQModel is skipped" >&2; EXTRA+=(--skip-gptqmodel); }
fi
if [ -z "${MERGEQUANT_MOE_MODEL:-}" ] && [ -f "$CARRY/moe-mixtral-base/config.json" ]; then
  export MERGEQUANT_MOE_MODEL="$ROOT/$CARRY/moe-mixtral-base"
fi
echo "setup took $(( $(date +%s) - T0 )) s"

echo "== bench/gpu_check.py $* ${EXTRA[*]:-}"
mkdir -p bench/work
LOG=bench/work/gpu-check-console.log
[ -n "${OUT:-}" ] && [ -d "$OUT" ] && LOG=$OUT/gpu-check-console.log  # there even if the command is stopped
$PY bench/gpu_check.py "$@" ${EXTRA[@]+"${EXTRA[@]}"} 2>&1 | tee "$LOG"
rc=${PIPESTATUS[0]}
echo "gpu_check.py exited $rc after $(( $(date +%s) - T0 )) s in all"

if [ -n "${OUT:-}" ] && [ -d "$OUT" ]; then
  if [ $DRY = 1 ]; then WORK=bench/work/gpu-check-dry; RES=$WORK/results; else WORK=bench/work/gpu-check; RES=bench/results; fi
  # (the driver already copied each JSON there as soon as it was written)
  cp "$RES"/gpu-check.json "$RES"/gpu-tests.json "$RES"/gpu-merge.json "$RES"/gpu-moe.json "$RES"/gpu-quant.json "$OUT"/ 2>/dev/null
  tar czf "$OUT"/gpu-check-logs.tgz -C "$WORK" logs gpu-tests.xml 2>/dev/null
  ls -la "$OUT"
fi
exit $rc

#!/usr/bin/env bash
# Installs the real clients for the int8 formats so the real-client tests can run:
#   bitsandbytes 0.50.2       loads --method int8 checkpoints (transformers load_in_8bit; has a CPU backend)
#   compressed-tensors 0.20.0 loads --method w8a8 checkpoints (transformers CompressedTensorsHfQuantizer)
# Both declare a torch requirement (bitsandbytes torch>=2.4, compressed-tensors torch>=2.10); with a
# CPU torch already installed pip would keep it, but to be certain a CPU torch is never replaced by a
# CUDA build they go in with --no-deps and their light runtime dependencies are listed by hand
# (numpy, packaging; pydantic, loguru, psutil; transformers is already a core dependency).
# Never fatal: without them, the real-client tests skip.
set -u
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
if pip install --no-deps bitsandbytes==0.50.2 compressed-tensors==0.20.0 loguru==0.7.3 \
   && pip install "numpy>=1.17" "packaging>=20.9" "pydantic>=2.0" psutil; then
  echo "int8 client stack installed (bitsandbytes 0.50.2, compressed-tensors 0.20.0)"
else
  echo "warning: could not install bitsandbytes/compressed-tensors; int8/w8a8 real-client tests will be skipped" >&2
fi
exit 0

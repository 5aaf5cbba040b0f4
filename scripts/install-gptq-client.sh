#!/usr/bin/env bash
# Installs the maintained GPTQ loader stack (transformers 5 loads GPTQ checkpoints only through
# gptqmodel + optimum) so the real-client tests can run. gptqmodel 7.7.0 and optimum declare torch
# requirements that would replace a CPU torch with a CUDA build, so they go in with --no-deps and their
# runtime dependencies are listed by hand (see docs/gptq-client-notes.md). Never fatal: without the
# stack, the real-client tests skip.
set -u
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
if pip install --no-deps gptqmodel==7.7.0 optimum==2.3.0 pypcre==0.6.4 tokenicer==0.0.14 logbar==0.4.15 \
       defuser==0.0.28 device-smi==0.5.7 torchao==0.18.0 \
   && pip install accelerate==1.15.0 requests==2.34.2 threadpoolctl==3.8.0 pillow==13.0.0 datasets==5.2.0; then
  echo "GPTQ client stack installed (gptqmodel 7.7.0, optimum 2.3.0)"
else
  echo "warning: could not install the GPTQ client stack; real-client tests will be skipped" >&2
fi
exit 0

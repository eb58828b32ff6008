#!/usr/bin/env bash
# Copy SGLang's and vLLM's GDN kernel sources from this environment into .engines/ (git-ignored,
# a few MB) so that `run` can carry them to the GPU machine, which has no internet:
#   bash scripts/engines_carry.sh            # here, with the engines installed (README)
#   then on the GPU machine, after the bundle's env:  . scripts/engines_env.sh
# The GPU side needs torch and triton; the small packages vLLM's modules import (regex, psutil,
# pyzmq, urllib3) ride along in .engines/deps, unpacked from wheels for the image's Python 3.12.
set -euo pipefail
cd "$(dirname "$0")/.."
python scripts/engines_carry.py .engines --deps "${GPU_PYTHON:-3.12}"
grep -qxF "/.engines/" .gitignore || echo "/.engines/ is not git-ignored" >&2

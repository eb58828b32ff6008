# Source on the GPU machine (after scripts/gpu_env.sh) to put the carried engine kernels on the path:
#   . scripts/engines_env.sh [DIR]      (DIR: where .engines/ was carried or copied; default ./.engines)
_gdn_engines=${1:-$PWD/.engines}
export PYTHONPATH="$_gdn_engines:$_gdn_engines/deps${PYTHONPATH:+:$PYTHONPATH}"

# Source on the GPU machine (after scripts/gpu_env.sh) to put the carried engine kernels on the path.
export PYTHONPATH="$PWD/.engines:$PWD/.engines/deps${PYTHONPATH:+:$PYTHONPATH}"

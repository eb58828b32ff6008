# Source on the GPU machine after the bundle install (DEVELOPERS: GPUs): puts the kernel packages
# and this checkout on the path without `pip install -e .`, and `gdncheck` on the command line.
. /opt/gdn-site/env.sh
mkdir -p /tmp/pp
ln -sfn "$PWD/reference" /tmp/pp/gdncheck_reference
ln -sfn "$PWD/cases" /tmp/pp/gdncheck_cases
export PYTHONPATH="$PWD:/tmp/pp${PYTHONPATH:+:$PYTHONPATH}" FLA_DISABLE_BACKEND_DISPATCH=1 PYTHONUNBUFFERED=1
gdncheck() { python -m gdncheck "$@"; }

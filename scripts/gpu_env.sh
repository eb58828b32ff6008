# Source on the GPU machine after the bundle install: puts the kernel packages and this checkout on
# the path without `pip install -e .`, and `gdncheck` on the command line.
# GDN_FLASHINFER=0.7.2.post1 puts that FlashInfer (unpacked to /opt/fi072) in front of 0.7.4.
. /opt/gdn-site/env.sh
if [ "${GDN_FLASHINFER:-0.7.4}" = "0.7.2.post1" ]; then . /opt/fi072/env072.sh; fi
mkdir -p /tmp/pp
ln -sfn "$PWD/reference" /tmp/pp/gdncheck_reference
ln -sfn "$PWD/cases" /tmp/pp/gdncheck_cases
# the engines' kernel sources (scripts/engines_carry.sh), carried once and kept in /tmp/gdn-engines
for d in "$PWD/.engines" /tmp/gdn-engines; do
  if [ -d "$d" ]; then . scripts/engines_env.sh "$d"; break; fi
done
export PYTHONPATH="$PWD:/tmp/pp${PYTHONPATH:+:$PYTHONPATH}" FLA_DISABLE_BACKEND_DISPATCH=1 PYTHONUNBUFFERED=1
gdncheck() { python -m gdncheck "$@"; }

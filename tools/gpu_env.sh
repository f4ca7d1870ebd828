# Source at the start of a device-tool command, from the repo root, with `.whl` carried
# (made by tools/gpu_wheels.sh): the lent GPU machine's image has no network and lacks
# some of fastrl's test and benchmark dependencies. This installs the carried wheels and
# fastrl itself (non-editable: `kernels/` becomes fastrl.kernels) into /tmp/site, copies
# tests/, bench/ and pyproject.toml to /tmp/work and cd's there, so that `import fastrl`
# finds the installed package rather than the source folder. Then, for example:
#   . tools/gpu_env.sh && python3 -m pytest -q -m gpu tests
#   python3 bench/bench_logprobs.py --out $OUT/logprobs.json
: "${PY:=python3}"
_repo=$PWD
if ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || return 1
fi
$PY -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --upgrade \
    --target /tmp/site "$_repo" || return 1
rm -rf /tmp/work && mkdir -p /tmp/work && cp -r tests bench pyproject.toml /tmp/work/ || return 1
export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
cd /tmp/work || return 1

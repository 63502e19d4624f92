#!/usr/bin/env bash
# The test command (CI runs exactly this): set up one virtual environment per end of the declared transformers
# range and run the whole suite in each, one torch thread per process.
#   bash scripts/test.sh                         both ends: newest (.venv), then lowest (.venv-lowest)
#   ENDS=newest bash scripts/test.sh             one end (newest | lowest)
#   ENDS=lowest bash scripts/test.sh -k qwen     extra arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."
LOWEST=5.19.0            # the lower bound of pyproject.toml's range (= LOWEST in adapters/_hf.py)
ENDS=${ENDS:-newest lowest}
export OMP_NUM_THREADS=1
passed=0; failed=0; skipped=0; status=0
for end in $ENDS; do
    case "$end" in
        newest) venv=.venv; pin="" ;;
        lowest) venv=.venv-lowest; pin=$LOWEST ;;
        *) echo "scripts/test.sh: unknown end '$end' (newest | lowest)" >&2; exit 2 ;;
    esac
    t0=$SECONDS
    VENV=$venv TRANSFORMERS=$pin bash scripts/setup.sh
    t1=$SECONDS
    log=$(mktemp)
    set +e
    "$venv/bin/python" -m pytest -q "$@" 2>&1 | tee "$log"
    rc=${PIPESTATUS[0]}
    set -e
    [ "$rc" -eq 0 ] || status=$rc
    line=$(tail -n 1 "$log"); rm -f "$log"
    for k in passed failed skipped; do
        n=$(grep -oE "[0-9]+ $k" <<<"$line" | grep -oE "[0-9]+" || true)
        eval "$k=\$(( $k + ${n:-0} ))"
    done
    tf=$("$venv/bin/python" -c 'import transformers; print(transformers.__version__)')
    echo "[$end end: transformers $tf, setup $((t1 - t0)) s, tests $((SECONDS - t1)) s, exit $rc]"
done
echo "total: $passed passed, $failed failed, $skipped skipped"
exit $status

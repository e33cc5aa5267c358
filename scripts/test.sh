#!/usr/bin/env bash
# The test command: set up the machine (idempotent), then run pytest in the project's virtualenv.
#   bash scripts/test.sh                 # whole suite: tests -q
#   bash scripts/test.sh tests/fetch -x  # any pytest arguments
# LAZYFS_TEST_TIMEOUT sets pytest-timeout's per-test limit in seconds (default 900).
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
bash "$repo/scripts/setup.sh"

cd "$repo"
if [[ $# -eq 0 ]]; then
    set -- tests -q
fi

status=0
# --timeout comes first so that one given on the command line wins.
"$repo/.venv/bin/python" -m pytest --timeout="${LAZYFS_TEST_TIMEOUT:-900}" "$@" || status=$?
if [[ $status -eq 5 ]]; then
    echo "test.sh: pytest collected no tests; that is a failure" >&2
fi
exit "$status"

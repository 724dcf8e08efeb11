#!/usr/bin/env bash
# Run the test suite: prepare the environment (scripts/setup_env.sh), then pytest.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k schedule -x`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/python -m pytest -q tests "$@"

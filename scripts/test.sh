#!/usr/bin/env bash
# Set up (idempotent), lint, then run the test suite; arguments go to pytest.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$ROOT/scripts/setup.sh"
cd "$ROOT"
echo "test: ruff check ."
.venv/bin/ruff check .
echo "test: pytest $*"
exec .venv/bin/python -m pytest "$@"

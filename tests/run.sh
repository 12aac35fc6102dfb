#!/usr/bin/env bash
# skinkd's test command (README): install with dev extras, check that notebooks and library are in sync
# and clean, run every notebook (nbdev_test), then the pytest suite. Exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."
step() { printf '\n== %s ==\n' "$*"; }

step "install skinkd with dev and benchmark extras"
python -m pip install -q -e ".[dev,bench]"
python -m pip check

snapshot() { find nbs skinkd -type f \( -name '*.py' -o -name '*.ipynb' \) -not -path '*/.ipynb_checkpoints/*' -print0 | sort -z | xargs -0 sha1sum; }

step "README.md is rendered from nbs/index.ipynb"
python .ci/render_readme.py --check

step "line discipline: no statement chained with ; and no line over 120 characters in skinkd/"
python .ci/lines.py

step "notebooks and library in sync (nbdev_export changes nothing)"
before=$(snapshot)
nbdev_export
if [ "$before" != "$(snapshot)" ]; then
  echo "nbdev_export changed the library: run nbdev_export and commit notebooks and skinkd/ together" >&2
  diff <(echo "$before") <(snapshot) >&2 || true
  exit 1
fi
if [ "${CI:-}" = "true" ] && [ -n "$(git status --porcelain)" ]; then
  echo "the checkout is not clean after nbdev_export:" >&2; git status --porcelain >&2; exit 1
fi

step "notebooks are clean (nbdev_clean changes nothing)"
before=$(snapshot)
nbdev_clean
if [ "$before" != "$(snapshot)" ]; then
  echo "nbdev_clean changed notebooks: run nbdev_clean (or install the hooks: nbdev_install_hooks) and commit" >&2
  exit 1
fi

step "nbdev_test: every notebook runs top to bottom"
nbdev_test --n_workers 2 --timing --do_print  # a line as each notebook starts and ends

step "pytest"
set +e
python -m pytest tests -q -ra --durations=15 "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then echo "pytest collected no tests: the suite is missing" >&2; exit 1; fi
exit "$status"

#!/usr/bin/env bash
# dinoscope developer entry point. Each command sets up .venv on first use (CPU torch pinned by constraints.txt).
#   ./dev.sh demo   set-up, then the main job on the embedded example data
#   ./dev.sh test   set-up, then ruff (lint + format check) and the test suite (what CI runs)
#   ./dev.sh setup  set-up only
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
VENV=.venv
EXTRAS="geo,bio,dist,cluster,tensorboard,curate,dev"

setup() {
  local stamp="$VENV/.dinoscope-installed"
  if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ] && [ "$stamp" -nt constraints.txt ]; then
    return
  fi
  echo "==> setting up $VENV (torch pinned by constraints.txt)" >&2
  [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
  # torch first, alone: with it in place nothing else can pull a CUDA build.
  "$VENV/bin/pip" install -q --disable-pip-version-check -c constraints.txt torch
  "$VENV/bin/pip" install -q --disable-pip-version-check -c constraints.txt -e ".[$EXTRAS]"
  touch "$stamp"
}

# Headless Chromium for the browser test of the demo report (tests/test_report_page.py, tests/test_demo.py). Installed
# with apt when absent and permitted; otherwise those tests are skipped with the reason.
browser() {
  command -v chromedriver >/dev/null 2>&1 && return
  command -v apt-get >/dev/null 2>&1 || return 0
  local as_root=""
  if [ "$(id -u)" != 0 ]; then
    sudo -n true 2>/dev/null || return 0
    as_root="sudo -n"
  fi
  echo "==> installing chromium and chromium-driver (headless browser test of the demo report)" >&2
  if ! { $as_root apt-get update -qq && DEBIAN_FRONTEND=noninteractive $as_root apt-get install -y -qq \
      chromium chromium-driver; } >/dev/null 2>&1; then
    echo "==> chromium could not be installed: the browser tests will be skipped" >&2
  fi
}

export NO_ALBUMENTATIONS_UPDATE=1 DS_ACCELERATOR=cpu

case "${1:-}" in
  setup) setup ;;
  demo)
    setup
    shift
    exec "$VENV/bin/dinoscope" demo "$@"
    ;;
  test)
    setup
    browser
    shift
    # Lint first (seconds): ruff's rule sets and formatting as configured in pyproject.toml; the import contract
    # (no cycles, core free of domains, layered core sub-packages) is tests/test_architecture.py.
    "$VENV/bin/ruff" check .
    "$VENV/bin/ruff" format --check .
    exec "$VENV/bin/python" -m pytest -q "$@"
    ;;
  *)
    echo "usage: ./dev.sh demo|test|setup" >&2
    exit 2
    ;;
esac

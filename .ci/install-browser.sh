#!/usr/bin/env bash
# Installs what the browser test of `jaxrlhf collect` needs (tests/test_collect_browser.py):
# headless Chromium and its WebDriver from Debian's packages, and Selenium into the venv.
# Idempotent: exits 0 at once when all three are present. Nothing is downloaded at test time
# (the test points Selenium at /usr/bin/chromium and /usr/bin/chromedriver, so selenium-manager
# never runs).
#
# Usage: .ci/install-browser.sh [VENV]   (default: .venv)
set -euo pipefail

VENV="${1:-.venv}"
PYTHON="$VENV/bin/python"
if [ ! -x "$PYTHON" ]; then
    echo "install-browser.sh: no python at $PYTHON (give the virtual environment as \$1)" >&2
    exit 1
fi

if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ] \
    && "$PYTHON" -c "import selenium" >/dev/null 2>&1; then
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi

if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then
    $SUDO apt-get update
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y --no-install-recommends \
        chromium chromium-driver
fi

if ! "$PYTHON" -c "import selenium" >/dev/null 2>&1; then
    "$PYTHON" -m pip install selenium
fi

"$PYTHON" -c "import selenium; print('selenium', selenium.__version__)"
/usr/bin/chromium --version
/usr/bin/chromedriver --version

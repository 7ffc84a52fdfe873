#!/usr/bin/env bash
# Headless Chromium for tests/ui/test_browser.py, from Debian's packages. Playwright drives it
# through executable_path; `playwright install` is never run: it downloads a browser build
# of its own, which this project's machines cannot fetch.
set -euo pipefail

if [ -x /usr/bin/chromium ]; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    SUDO=sudo
else
    SUDO=
fi
echo "installing Debian's chromium for the browser test"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium fonts-dejavu-core
/usr/bin/chromium --version

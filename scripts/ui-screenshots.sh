#!/usr/bin/env bash
# Remakes the dashboard's screenshots in docs/ (shown in the README): runs
# the browser test (a real SQLite queue, a worker, Chromium) with
# GPUPOOL_UI_SCREENSHOTS set. Needs chromium and chromium-driver
# (apt-get install chromium chromium-driver).
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
cd "$here"
GPUPOOL_REQUIRE_BROWSER=1 GPUPOOL_UI_SCREENSHOTS="$here/docs" \
  cargo test -p gpupool-cli --test browser -- --nocapture
ls -l docs/ui-*.png

#!/usr/bin/env bash
# Vendors the dashboard's one outside library, uPlot (MIT), from npm into
# gpupool-cli/src/ui/vendor/uplot/, where `gpupool ui` embeds it (no CDN:
# the dashboard works offline). Run it to update the copy; the checksums
# below are of the files kept, checked after each run.
set -euo pipefail
VERSION=1.6.32
here="$(cd "$(dirname "$0")/.." && pwd)"
dest="$here/gpupool-cli/src/ui/vendor/uplot"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && npm pack "uplot@$VERSION" >/dev/null && tar xzf "uplot-$VERSION.tgz")
mkdir -p "$dest"
cp "$tmp/package/dist/uPlot.iife.min.js" "$tmp/package/dist/uPlot.min.css" "$tmp/package/LICENSE" "$dest/"
(cd "$dest" && sha256sum -c <<'SUMS'
19c8d4c6ad88929a79f4ae49d6f7161566dfd0ba3d15cc495e974f787eb78f1f  uPlot.iife.min.js
df630c6a8d6f8eeaff264b50f73ce5b114f646ffd9a0bb74f049b0a00135fa04  uPlot.min.css
8f989229699b4fe2f1a0432d0e9edc338a8a911e250e2d1b01ecd770a5f5b1bd  LICENSE
SUMS
)
echo "uPlot $VERSION vendored into $dest"

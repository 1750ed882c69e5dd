#!/usr/bin/env bash
# Documented check of the HTML report: render it in headless Chromium and look at the PNG.
#   apt-get install chromium    (once)
#   bash bench/html_screenshot.sh [OUT_DIR]
set -euo pipefail
out=${1:-build/html-check}
mkdir -p "$out"
.venv/bin/qconvert kmeans samples/digits_cnn.onnx --bits 3 --data samples/digits_test.npz --min-snr 15 \
  -o "$out/digits.onnx" --report-html "$out/digits.html" -q
chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking \
  --disable-component-update --disable-sync --user-data-dir="$(mktemp -d)" --window-size=1100,1500 \
  --screenshot="$out/digits.png" "file://$(realpath "$out/digits.html")" 2>/dev/null
echo "look at $out/digits.png"

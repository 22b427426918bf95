#!/bin/bash
# tests/report_browser_test.sh — the run report in a real headless browser (Debian's
# chromium): a tiny training run writes RUN/report.html; the page, with a checking
# script appended, is loaded and its DOM dumped (every <img> must have decoded:
# naturalWidth > 0), then screenshotted, and the screenshot must show the loss figure's
# EMA colour and the light raw-curve colour (the plot was drawn, not a broken image).
# Without chromium it reports one skip and passes. KEEP_SHOT=path keeps the screenshot.
# Usage: bash tests/report_browser_test.sh [path/to/iddpm]
IDDPM=${1:-./iddpm}
if ! command -v chromium >/dev/null 2>&1; then
    echo "ok - report_browser # SKIP chromium is not installed (apt-get install chromium)"
    exit 0
fi
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
RUN="$TMP/run"
echo "# seed 0; tmp $TMP"
if ! "$IDDPM" train dataset=random image_size=8 num_images=8 in_channels=1 num_channels=32 num_res_blocks=1 \
        channel_mult=1,2 attention_resolutions= learn_sigma=true diffusion_steps=20 noise_schedule=cosine \
        batch_size=4 max_steps=30 log_interval=1 save_interval=10 sample_interval=10 num_samples=4 sample_steps=5 \
        seed=0 run_dir="$RUN" >"$TMP/train.txt" 2>&1; then
    echo "not ok - report_browser: the training run failed"; tail -5 "$TMP/train.txt"; exit 1
fi
if [ -f "$RUN/report.html" ]; then echo "ok - report_browser: training wrote report.html"
else echo "not ok - report_browser: training wrote no report.html"; exit 1; fi

chrome() {   # chromium's own chatter (dbus, GPU) goes to a log
    timeout 60 chromium --headless --no-sandbox --disable-gpu --user-data-dir="$TMP/profile" "$@" 2>>"$TMP/chromium.log"
}

# 1. every image decodes: a script appended to a copy of the page writes what it saw
sed 's#</body>#<pre id="imgcheck"></pre><script>window.addEventListener("load", function () {\
  var imgs = document.images, ok = 0;\
  for (var i = 0; i < imgs.length; i++) if (imgs[i].complete \&\& imgs[i].naturalWidth > 0) ok++;\
  document.getElementById("imgcheck").textContent = "images=" + imgs.length + " decoded=" + ok;\
});</script></body>#' "$RUN/report.html" >"$RUN/check.html"
chrome --virtual-time-budget=10000 --dump-dom "file://$RUN/check.html" >"$TMP/dom.html"
line=$(grep -o 'images=[0-9]* decoded=[0-9]*' "$TMP/dom.html")
n=$(echo "$line" | sed 's/images=\([0-9]*\).*/\1/'); d=$(echo "$line" | sed 's/.*decoded=//')
# loss.png and the grids at steps 10, 20, 30
if [ -n "$n" ] && [ "$n" = "4" ] && [ "$d" = "$n" ]; then echo "ok - report_browser: all $n images decode ($line)"
else echo "not ok - report_browser: images in the page: '${line:-no result}' (want images=4 decoded=4)"; fi

# 2. a screenshot shows the plots
chrome --window-size=1280,2400 --screenshot="$TMP/shot.png" "file://$RUN/report.html" >/dev/null
if [ ! -s "$TMP/shot.png" ]; then echo "not ok - report_browser: no screenshot"; exit 1; fi
[ -n "${KEEP_SHOT:-}" ] && cp "$TMP/shot.png" "$KEEP_SHOT"
cat >"$TMP/check_shot.lua" <<'EOF_LUA'
local iddpm = require "iddpm"
local plot = require "iddpm.plot"
local u = iddpm.io.png_read(arg[1], 3)
local s = u:shape()
local px = u:totable()
-- screenshot colours may differ by colour management; within this many levels counts
local TOL_LEVEL = 12
local function count(c)
  local n = 0
  for i = 0, s[1] * s[2] - 1 do
    if math.abs(px[3 * i + 1] - c[1]) <= TOL_LEVEL and math.abs(px[3 * i + 2] - c[2]) <= TOL_LEVEL
      and math.abs(px[3 * i + 3] - c[3]) <= TOL_LEVEL then n = n + 1 end
  end
  return n
end
local ema, raw, white = count(plot.COLORS.ema), count(plot.COLORS.raw), count({255, 255, 255})
print(("# screenshot %dx%d: %d EMA-coloured, %d raw-coloured, %d white pixels"):format(s[2], s[1], ema, raw, white))
print(((ema > 200 and raw > 50) and "ok" or "not ok") .. " - report_browser: the screenshot shows the loss curves")
print((white < s[1] * s[2] * 0.97 and "ok" or "not ok") .. " - report_browser: the screenshot is not blank")
EOF_LUA
"$IDDPM" run "$TMP/check_shot.lua" "$TMP/shot.png"

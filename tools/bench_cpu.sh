#!/usr/bin/env bash
# Runs every CPU benchmark suite in sequence (each writes bench/results/<suite>-cpu<threads>-<arch>.json)
# and keeps the printed tables in bench/results/cpu-tables.txt. Run it on an otherwise idle machine:
# the suites compare against baselines measured in the same process, but the ceilings (read
# bandwidth, matmul rate) and absolute times are only meaningful without other load.
set -uo pipefail
cd "$(dirname "$0")/.."
out=bench/results/cpu-tables.txt
: > "$out"
for suite in ${@:-sampling attention sparse quant engine search}; do
  echo "== ttscale bench $suite ($(date -u +%FT%TZ), load: $(cut -d' ' -f1-3 /proc/loadavg))" | tee -a "$out"
  ttscale bench "$suite" 2>&1 | tee -a "$out"
done

#!/bin/sh
# Run every benchmark on both backends with the default sizes, one after the other.
# Usage: benchmarks/run_all.sh [output-folder]   (default: a new folder under /tmp)
# Each benchmark's full output goes to <folder>/<name>_<backend>.txt; its last line is JSON.
# The machine should be idle: check `uptime` first (load average well below 0.5 per core).
set -eu
here=$(cd "$(dirname "$0")" && pwd)
python=${PYTHON:-python}
out=${1:-$(mktemp -d /tmp/aioasync_bench.XXXXXX)}
mkdir -p "$out"
echo "results in $out; load: $(cat /proc/loadavg)"
for backend in postgres sqlite; do
    for bench in raw_baseline drain create latency checkpoints scale scheduling; do
        extra=""
        # SQLite has no NOTIFY: its latency is its poll interval; show the default and 50 ms.
        if [ "$bench" = latency ] && [ "$backend" = sqlite ]; then
            "$python" "$here/latency.py" --backend sqlite --poll-interval 0.05 \
                >"$out/latency_sqlite_poll50ms.txt" 2>&1 || echo "latency (poll 50 ms) failed"
        fi
        echo "== $bench $backend ($(cut -d' ' -f1-3 /proc/loadavg))"
        "$python" "$here/$bench.py" --backend "$backend" $extra >"$out/${bench}_${backend}.txt" 2>&1 \
            || echo "$bench $backend failed (see $out/${bench}_${backend}.txt)"
        grep -v '^{' "$out/${bench}_${backend}.txt" | sed '/^$/d' | tail -n 12
    done
done

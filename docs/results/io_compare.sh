#!/usr/bin/env bash
# Before/after of the I/O path: the same harness (this checkout's `signal-worker bench --io-only`)
# drives the worker code of a base commit and of this checkout, interleaved, N runs each.
# Usage: docs/results/io_compare.sh BASE_COMMIT [N] > docs/results/io_compare.jsonl
# The base tree gets this checkout's bench harness; where the base worker lacks `sampling_log`
# (only read by the model benchmark), a one-line shim adds it. Run on an otherwise idle machine.
set -euo pipefail
base=${1:?base commit}; runs=${2:-3}
here=$(git rev-parse --show-toplevel)
py="$here/.venv/bin/python"
tree=$(mktemp -d)/base
git -C "$here" worktree add -q --detach "$tree" "$base"
trap 'git -C "$here" worktree remove --force "$tree"' EXIT
cp "$here/worker/cli/service_commands.py" "$tree/worker/cli/service_commands.py"
# The harness and the dev/transport modules it needs (older bases lack them or keep them elsewhere).
mkdir -p "$tree/worker/dev"
cp "$here/worker/dev/bench_worker.py" "$tree/worker/dev/bench_worker.py"
cp "$here/worker/transport/reader.py" "$tree/worker/transport/reader.py"  # additions only: follow(), max_records
for f in worker/dev/__init__.py worker/dev/embedded.py; do
  [ -e "$tree/$f" ] || cp "$here/$f" "$tree/$f"
done
# The base code did not tune the collector: its worker runs without settle_heap().
sed -i 's/^    settle_heap()$/    pass/' "$tree/worker/dev/bench_worker.py"
grep -q "sampling_log" "$tree/worker/service/app.py" || sed -i \
  's/^\(        self.sampling_ms: deque\[float\] = deque(maxlen=100_000).*\)$/\1\n        self.sampling_log: deque[tuple[float, float]] = deque()/' \
  "$tree/worker/service/app.py"
for i in $(seq "$runs"); do
  for variant in base head; do
    root=$here; [ "$variant" = base ] && root=$tree
    line=$(cd "$root" && PYTHONPATH="$root" "$py" -m worker.cli.main bench --io-only --symbols 50 --bars 800 2>/dev/null | tail -1)
    echo "{\"variant\": \"$variant\", \"commit\": \"$( [ $variant = base ] && echo "$base" || git -C "$here" rev-parse --short HEAD)\", \"run\": $i, \"result\": $line}"
  done
done

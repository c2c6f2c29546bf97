#!/usr/bin/env bash
# Time to the first IB-GL step of the demo, source trees side by side: `lbr train --stage ib-gl` with WORKERS (1),
# 4 steps, on each tree in turn, ROUNDS times (interleaved, so the machine's drift hits every tree alike). One JSON
# line per run to OUT: the tree, the round, the command's wall time, the first logged loss (equal trees train the
# same stream), the driver's milestones and the worker's (seconds since the command started).
#   bash benchmarks/first_step.sh ROUNDS OUT TREE [TREE ...]
set -euo pipefail
rounds=$1; out=$(realpath -m "$2"); shift 2
trees=(); for tree in "$@"; do trees+=("$(realpath "$tree")"); done
py=${PYTHON:-$(pwd)/.venv/bin/python}  # absolute (the runs cd into the trees), not resolved (a venv's python is a link)
mkdir -p "$(dirname "$out")"; : > "$out"
tmp=$(mktemp -d)
for round in $(seq "$rounds"); do
  for tree in "${trees[@]}"; do
    run="$tmp/run-$round-$(basename "$tree")"
    start=$(date +%s.%N)
    (cd "$tree" && PYTHONPATH="$tree" DS_ACCELERATOR=cpu "$py" -m cli.main train --stage ib-gl \
      --config configs/demo.yaml --output "$run" --num-workers "${WORKERS:-1}" --set ib_gl.max_steps=4 \
      --set ib_gl.log_every=2 --set run.tensorboard=false > "$run.log" 2>&1)
    end=$(date +%s.%N)
    "$py" - "$run" "$tree" "$round" "$start" "$end" >> "$out" <<'EOF'
import json, os, sys
run, tree, rnd, start, end = sys.argv[1:]
first = json.loads(open(f"{run}/ib_gl/metrics.jsonl").readline())
driver = json.load(open(f"{run}/summary.json")).get("startup_driver_s", {})
print(json.dumps({"tree": tree, "round": int(rnd), "workers": int(os.environ.get("WORKERS", 1)),
                  "wall_s": round(float(end) - float(start), 1),
                  "loss": first["loss"], **{f"startup_driver_{k}_s": round(v, 1) for k, v in driver.items()},
                  **{k: round(v, 1) for k, v in first.items() if k.startswith("startup_") or k == "first_step_s"},
                  "load": open("/proc/loadavg").read().split()[0]}))
EOF
    tail -1 "$out"
  done
done
rm -rf "$tmp"

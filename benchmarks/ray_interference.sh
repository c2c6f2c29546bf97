#!/usr/bin/env bash
# What Ray's mere presence costs a compute loop on a small machine, two experiments, interleaved:
#  1. the plain torch loop of benchmarks/overhead.py (the demo's 150 IB-GL batches) alone vs next to an idle Ray head
#     (`ray start --head`: GCS, raylet, dashboard and agents, prestarted workers; no job), ROUNDS rounds;
#  2. `lbr train --stage ib-gl`, 1 worker, 150 steps, with Ray's default worker niceness (15) vs RAY_worker_niceness=0,
#     2 rounds.
# One line per run (steady-state step time: median window of the second half) to stdout.
# CAUTION: the idle head is stopped with `ray stop --force`, which stops every Ray on this machine.
#   bash benchmarks/ray_interference.sh [ROUNDS]
set -u
rounds=${1:-3}
PY=${PYTHON:-.venv/bin/python}
export DS_ACCELERATOR=cpu PYTHONPATH=$(pwd)
tmp=$(mktemp -d); B=$tmp/batches.pt
$PY benchmarks/overhead.py --child batches --steps 150 --batches "$B" > /dev/null 2>&1
plain() {
  OVERHEAD_T0=$(date +%s.%N) $PY benchmarks/overhead.py --child plain --steps 150 --log-every 10 --batches "$B" \
    2>/dev/null | tail -1 | $PY -c "import json,sys; d=json.load(sys.stdin); print('$1', $2, round(d['steady_step_time_s'], 4))"
}
for r in $(seq "$rounds"); do
  plain alone "$r"
  RAY_ADDRESS= $PY -m ray.scripts.scripts start --head --num-cpus 4 --include-dashboard false \
    --node-ip-address 127.0.0.1 --port 6399 > /dev/null 2>&1
  sleep 5
  plain next_to_idle_ray "$r"
  $PY -m ray.scripts.scripts stop --force > /dev/null 2>&1
done
for r in 1 2; do
  for nice in default 0; do
    out=$tmp/nice-$nice-$r
    if [ "$nice" = 0 ]; then export RAY_worker_niceness=0; else unset RAY_worker_niceness; fi
    $PY -m cli.main train --stage ib-gl --config configs/demo.yaml --output "$out" --num-workers 1 \
      --set ib_gl.max_steps=150 --set ib_gl.log_every=10 --set ib_gl.checkpoint_every=1500 \
      --set run.tensorboard=false > "$out.log" 2>&1
    $PY - "$out" "$nice" "$r" <<'PYEOF'
import json, statistics, sys
out, nice, r = sys.argv[1:]
w = [json.loads(line)["step_time_s"] for line in open(f"{out}/ib_gl/metrics.jsonl") if "step_time_s" in line]
print(f"lbr_niceness_{nice}", r, round(statistics.median(w[len(w) // 2:]), 4))
PYEOF
  done
done
unset RAY_worker_niceness
rm -rf "$tmp"

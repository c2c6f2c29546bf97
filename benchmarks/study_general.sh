#!/usr/bin/env bash
# "Does LBR help?": the general base's held-out perplexities, then the medical and chemistry studies on that base
# (docs/study.md). Needs runs/base-general/lm/model (lbr train --stage lm --config configs/study/base-general.yaml). The
# studies train and test on the repo's data slice (data/demo: a fresh clone can rerun them); the perplexities use the
# full shared data (../shared/data). Results: benchmarks/results/base_general.json, study_general_{medical,chemistry}.*
# Usage: bash benchmarks/study_general.sh [perplexity|medical-main|chemistry|chemistry-resume|medical|diagnostic]...
# (default: all, in that order: the medical grid's 12 main cells, then chemistry, then the medical study resumed for
# its k sweep and from-scratch controls, then the diagnostic: lbr and cl with 4x the GR-CL steps)
set -euo pipefail
cd "$(dirname "$0")/.."
LBR=${LBR:-.venv/bin/lbr}
PY=${PY:-.venv/bin/python}
DATA=${DATA:-data/demo}
RES=benchmarks/results
EVAL="--test-max-queries 200 --test-max-corpus 1000"
export RAY_worker_niceness=0   # Ray starts its workers at nice 15; the study's workers get the machine's priority

copy() {  # study folder -> benchmarks/results/study_general_<domain>.*
  for ext in md json csv; do cp "$1/results.$ext" "$RES/study_general_$2.$ext"; done
  cp "$1/study.png" "$RES/study_general_$2.png"
}

run() {
  echo "== $1: $(date -u +%FT%TZ) on $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg)"
  case $1 in
    perplexity)
      $PY benchmarks/base_perplexity.py --model runs/base-general/lm/model --data-root ../shared/data \
          --domains code,biology,medical,chemistry --texts 400 --out $RES/base_general.json ;;
    medical-main)  # the whole grid is started; it is stopped (Ctrl-C) once the 12 main cells are done
      $LBR study --config configs/study/study-general.yaml --target medical --heldout biology,chemistry --data-root "$DATA" \
          --variants 'lbr,gl-cl,cl,cl-mc,lbr+bottleneck.k=1@0,lbr+bottleneck.k=2@0,lbr+bottleneck.k=4@0,lbr+bottleneck.k=8@0,lbr+model.from_scratch=true@0,cl+model.from_scratch=true@0' \
          --seeds 0,1,2 $EVAL --output runs/study-medical &
      pid=$!
      until [ "$(ls runs/study-medical/cells/*/cell.json 2>/dev/null | wc -l)" -ge 12 ] || ! kill -0 $pid 2>/dev/null; do
        sleep 10
      done
      kill -INT $pid 2>/dev/null || true
      wait $pid || true
      copy runs/study-medical medical ;;
    medical)  # continue the medical study: its remaining cells (k sweep, controls)
      $LBR study --output runs/study-medical --resume
      copy runs/study-medical medical ;;
    chemistry-resume)  # continue the chemistry study: its remaining cells
      $LBR study --output runs/study-chemistry --resume
      copy runs/study-chemistry chemistry ;;
    diagnostic)  # does LBR's edge over cl grow or vanish when stage 2 is trained longer? (160 GR-CL steps, seed 0)
      $LBR study --config configs/study/study-general.yaml --target medical --heldout biology,chemistry --data-root "$DATA" \
          --set gr_cl.max_steps=160 --variants lbr,cl --seeds 0 $EVAL --output runs/study-medical-long
      copy runs/study-medical-long medical_long ;;
    chemistry)
      $LBR study --config configs/study/study-general.yaml --target chemistry --heldout biology,medical --data-root "$DATA" \
          --variants lbr,gl-cl,cl,cl-mc --seeds 0,1 $EVAL --output runs/study-chemistry
      copy runs/study-chemistry chemistry ;;
    *) echo "unknown part $1" >&2; exit 2 ;;
  esac
  echo "== $1 done: $(date -u +%FT%TZ)"
}

for part in "${@:-perplexity medical-main chemistry medical diagnostic}"; do
  for p in $part; do run "$p"; done
done

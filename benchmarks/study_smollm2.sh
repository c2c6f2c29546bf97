#!/usr/bin/env bash
# "Does LBR help a real LLM?" (issue 23): the SmolLM2-135M grid, every finished cell committed as it finishes
# (benchmarks/results/study_smollm2_<target>/), so that any clone continues where the last session stopped:
#   bash benchmarks/study_smollm2.sh            # mine (once), then the medical study, then chemistry; resumes each
# Medical: lbr, gl-cl, cl, cl-mc x seeds 0, 1, 2, then lbr and cl with MiniLM-mined hard negatives (seeds 0, 1), then
# the k sweep (fixed k 1 and 4, seed 0); biology held out. Chemistry: lbr, cl, cl-mc x seeds 0, 1; medical held out.
# Every cell is tested on the same 1,000 target queries against 5,000 passages (chemistry: its 527 test queries) and
# on the held-out domain's test queries; BM25, MiniLM and the untrained base on the same sets. Needs `make smollm2`.
set -euo pipefail
cd "$(dirname "$0")/.."
LBR=${LBR:-.venv/bin/lbr}
CONFIG=configs/smollm2-135m-medical.yaml
EVAL="--baselines bm25,minilm,base --test-max-queries 1000 --test-max-corpus 5001"  # 5,001: two sampled texts are one
MINED=runs/mined/medical-minilm.jsonl.gz
HN="data.pairs=$MINED+gr_cl.hard_negatives=1"
export RAY_worker_niceness=0   # Ray starts its workers at nice 15; the study's workers get the machine's priority
export DS_ACCELERATOR=cpu

study() {  # target heldout seeds variants: a new study, or the committed one resumed
  local target=$1 results=benchmarks/results/study_smollm2_$1 out=runs/study-smollm2-$1
  echo "== $target: $(date -u +%FT%TZ) on $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg)"
  if [ -f "$results/study.json" ]; then
    $LBR study --output "$out" --results "$results" --resume --commit
  else
    $LBR study --config $CONFIG --target "$target" --heldout "$2" --seeds "$3" --variants "$4" $EVAL \
        --output "$out" --results "$results" --commit
  fi
}

finished() { python3 -c 'import json, sys; sys.exit(not json.load(open(sys.argv[1]))["finished"])' "$1" 2>/dev/null; }

if ! finished benchmarks/results/study_smollm2_medical/results.json; then  # the mined pairs serve medical cells only
  [ -f $MINED ] || $LBR mine ../shared/data/medical --baseline minilm --output $MINED
  study medical biology 0,1,2 "lbr,gl-cl,cl,cl-mc,lbr+$HN@0/1,cl+$HN@0/1,lbr+bottleneck.k=1@0,lbr+bottleneck.k=4@0"
  # An interrupted study (`kill -INT` of lbr study: it writes and commits the report, then exits 0) stops the script
  # here too, so that chemistry starts only after the whole medical grid, as the grid's order asks.
  finished benchmarks/results/study_smollm2_medical/results.json || { echo "== chemistry waits"; exit 0; }
fi
study chemistry medical 0,1 "lbr,cl,cl-mc"

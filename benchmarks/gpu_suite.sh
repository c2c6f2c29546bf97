#!/usr/bin/env bash
# The GPU suite of issue 11: lbr-ray on one GPU through Ray Train + DeepSpeed, measured, in one command that ends
# within SUITE_BUDGET seconds (default 470) and writes 9 files to $OUT (docs/performance.md, "The GPU suite"):
#
#   suite.log      everything the suite printed          timings.jsonl  one line per phase: seconds, exit code
#   env.json       machine, versions, bundle install      train.json     phases train + eval (lbr train, lbr eval)
#   overhead.json  phase overhead (overhead.py)           backends.json  phase backends (attention.py)
#   fused_ce.json  phase fused_ce (fused_ce.py)           logs.tar.gz    the run's logs, metrics and reports
#   gradcache.json phase gradcache (gradcache.py)
#
# Phases, each under its own time limit (cut to what is left of the budget) and writing its file when it ends:
#   install   .gpu_bundle (benchmarks/gpu_bundle.sh) and lbr itself into a pip --target folder on PYTHONPATH
#   train     lbr train --stage all, benchmarks/gpu_suite.yaml: Qwen2.5-0.5B's shape from random weights, bf16,
#             FlexAttention, packed 2,048-token rows, the run-start self-check, 1 GPU, Ray Train + DeepSpeed ZeRO-2
#   eval      lbr eval of that model on the GPU (Ray Data encoder actor)
#   overhead  the stage's first 30 batches through a plain torch loop and DeepSpeed's engine in one process, against
#             the train phase's IB-GL stage (Ray Train + Ray Data + DeepSpeed) on the same batches
#   fused_ce  lbr's LM head against liger-kernel's fused linear cross-entropy at the 151,936-token vocabulary
#   gradcache GR-CL's step with and without gr_cl.cache_chunk (GradCache): peak GPU memory and step time against
#             the batch, up to a batch the plain step cannot hold
#   backends  dense / flex / kv_split x padded / packed rows, tokens/s, MFU, peak memory (model step, no Ray)
#
#   bash benchmarks/gpu_suite.sh                     # on the GPU machine (carry .gpu_bundle)
#   PYTHON=.venv/bin/python bash benchmarks/gpu_suite.sh --cpu-smoke   # the same phases, tiny, on this CPU
# --cpu-smoke: tiny Qwen2 shape, CPU, dense backend (FlexAttention has no CPU backward), a few steps, the given
# Python's own packages; add --install to install the bundle as on the GPU (a bundle built for that Python:
#   PYVER=3.11 bash benchmarks/gpu_bundle.sh /tmp/bundle311
#   PYTHON=.venv/bin/python BUNDLE=/tmp/bundle311 bash benchmarks/gpu_suite.sh --cpu-smoke --install).
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
SMOKE=0 INSTALL=1
for arg in "$@"; do
  case $arg in
    --cpu-smoke) SMOKE=1 INSTALL=0 ;;
    --install) FORCE_INSTALL=1 ;;
    *) echo "unknown option $arg" >&2; exit 2 ;;
  esac
done
[[ ${FORCE_INSTALL:-0} == 1 ]] && INSTALL=1
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/lbr-gpu-suite-out}
WORK=${SUITE_WORK:-/tmp/lbr-gpu-suite}
if [[ -z ${SUITE_WORK:-} ]] && (($(df -B1G --output=avail /dev/shm 2>/dev/null | tail -1 || echo 0) >= 48)); then
  WORK=/dev/shm/lbr-gpu-suite  # runs and checkpoints in memory: a stage's checkpoint is 8 GB at 0.5B, written twice
fi
BUNDLE=${BUNDLE:-$ROOT/.gpu_bundle}
SCALE=$((SMOKE == 1 ? 4 : 1))  # the smoke's tiny steps run on 2 shared cores: longer limits
START=$(date +%s)
DEADLINE=$((START + ${SUITE_BUDGET:-$((470 * SCALE))}))
rm -rf "$WORK" && mkdir -p "$OUT" "$WORK"
exec > >(tee -a "$OUT/suite.log") 2>&1
TEE=$!
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0 \
       TOKENIZERS_PARALLELISM=false LBR_CACHE=$WORK/cache PYTHONPATH=$ROOT

if [[ $SMOKE == 1 ]]; then
  export DS_ACCELERATOR=cpu
  PRESET=tiny DEVICE=cpu GPU=--no-gpu
  RUN_SET=(--set model.dtype=float32 --set model.attn_backend=dense --set deepspeed.bf16=false
           --set scaling.use_gpu=false --set data.max_input_tokens=64 --set data.max_target_tokens=64
           --set bottleneck.k_max=4 --set ib_gl.pack_length=256 --set ib_gl.batch_size=4 --set ib_gl.log_every=2
           --set gr_cl.batch_size=16 --set gr_cl.log_every=2 --set gr_cl.eval_every=4 --set gr_cl.eval_queries=50
           --set gr_cl.eval_corpus=200)
  TRAIN_SET=(--set ib_gl.max_steps=4 --set gr_cl.max_steps=4)
  EVAL_CAP=(--max-queries 50 --max-corpus 300)
  BACKENDS=(--lengths 32 --batch 2 --repeats 1)
  FUSED=(--hidden 64 --vocab 4096 --rows 256 --repeats 2)
  OVERHEAD=(--steps 4 --log-every 2)  # = the train phase's IB-GL steps and logging
  GRADCACHE=(--batches 4 --cached-only 16 --chunk 2 --steps 1)
else
  PRESET=qwen0.5b DEVICE=cuda GPU=--gpu RUN_SET=() TRAIN_SET=()
  EVAL_CAP=(--max-queries 200 --max-corpus 1000)
  BACKENDS=(--lengths 1024,512 --batch 8 --repeats 5)
  FUSED=(--rows 4096,16384 --repeats 5)
  OVERHEAD=(--steps 30 --log-every 5)  # = benchmarks/gpu_suite.yaml's ib_gl.max_steps and log_every
  GRADCACHE=(--batches 32 --cached-only 256 --chunk 16 --steps 2)  # plan: 59 GiB at 32; 410 / 21 at 256
fi

phase() {  # phase NAME LIMIT_S CMD...: run CMD under `timeout` (cut to the suite's deadline), log to timings.jsonl
  local name=$1 limit=$(($2 * SCALE)) left rc t0 ms
  shift 2
  left=$((DEADLINE - $(date +%s)))
  ((left < limit)) && limit=$left
  if ((limit < 15)); then
    echo "=== $name: skipped, the suite's budget is spent"
    printf '{"phase": "%s", "skipped": "suite budget spent"}\n' "$name" >>"$OUT/timings.jsonl"
    return 1
  fi
  echo "=== $name: start $(date -u +%T), limit ${limit}s: $*"
  t0=$(date +%s%N)
  timeout --kill-after=10 "$limit" "$@"
  rc=$?
  ms=$((($(date +%s%N) - t0) / 1000000))
  printf '{"phase": "%s", "seconds": %d.%d, "rc": %d, "timed_out": %s, "limit_s": %d, "since_start_s": %d}\n' \
    "$name" $((ms / 1000)) $((ms % 1000 / 100)) "$rc" "$([[ $rc == 124 || $rc == 137 ]] && echo true || echo false)" \
    "$limit" "$(($(date +%s) - START))" | tee -a "$OUT/timings.jsonl"
  if [[ $SMOKE == 0 && ($rc == 124 || $rc == 137) ]]; then  # a timed-out phase may leave its Ray running
    ray stop --force >/dev/null 2>&1
  fi
  return "$rc"
}

install_bundle() {  # the bundle's wheels, Ray (unxz), DeepSpeed (built here) and lbr into $WORK/site, offline
  local site=$WORK/site
  mkdir -p "$WORK/wheels"
  "$PY" -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' \
    "$(ls "$BUNDLE"/ray-*.whl.xz)" "$WORK/wheels/$(basename "$BUNDLE"/ray-*.whl.xz .xz)" || return
  local pip=("$PY" -m pip install -q --no-index --no-deps --no-cache-dir --upgrade --target "$site")
  "${pip[@]}" --no-compile "$BUNDLE"/wheels/*.whl "$WORK"/wheels/ray-*.whl || return
  DS_BUILD_OPS=0 "${pip[@]}" --no-build-isolation "$BUNDLE"/deepspeed-*.tar.gz || return
  "${pip[@]}" --no-build-isolation "$ROOT"  # the `lbr` command; without it the suite runs `python -m cli.main`
  rm -rf "$ROOT/build"
}

record_env() {  # machine, versions and what the install gave, to env.json
  "$PY" - "$OUT/env.json" "$SMOKE" <<'EOF'
import importlib, importlib.metadata as md, json, os, platform, subprocess, sys
import torch
env = {"smoke": sys.argv[2] == "1", "python": sys.version.split()[0], "executable": sys.executable,
       "cpus": os.cpu_count(), "torch": torch.__version__, "cuda": torch.version.cuda,
       "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor(),
       "pythonpath": os.environ.get("PYTHONPATH"), "versions": {}}
for name in ("ray", "deepspeed", "transformers", "peft", "pydantic", "liger-kernel", "triton", "faiss-cpu",
             "numpy", "pandas", "pyarrow", "typing_extensions", "lbr-ray"):
    try:
        env["versions"][name] = md.version(name)
    except md.PackageNotFoundError:
        env["versions"][name] = None
try:
    env["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.max.sm",
                                        "--format=csv"], capture_output=True, text=True, timeout=20).stdout
except (OSError, subprocess.TimeoutExpired) as e:
    env["nvidia_smi"] = str(e)
for mod in ("ray", "ray.train", "ray.data", "ray.tune", "deepspeed", "liger_kernel", "faiss"):
    try:
        m = importlib.import_module(mod)
        env.setdefault("imports", {})[mod] = getattr(m, "__file__", "ok")
    except Exception as e:  # noqa: BLE001
        env.setdefault("imports", {})[mod] = f"{type(e).__name__}: {e}"
json.dump(env, open(sys.argv[1], "w"), indent=1)
print(json.dumps(env, indent=1))
EOF
}

collect_train() {  # the run's summary, metrics of both stages and the eval report, to train.json
  "$PY" - "$WORK" "$OUT/train.json" <<'EOF'
import json, sys
from pathlib import Path
work, doc = Path(sys.argv[1]), {}
def rows(p):
    return [json.loads(x) for x in p.read_text().splitlines() if x.strip()] if p.is_file() else None
for name, path in (("summary", work / "run/summary.json"), ("eval", work / "eval/report.json")):
    doc[name] = json.loads(path.read_text()) if path.is_file() else None
for stage in ("ib_gl", "gr_cl"):
    doc[f"{stage}_metrics"] = rows(work / "run" / stage / "metrics.jsonl")
json.dump(doc, open(sys.argv[2], "w"), indent=1)
for stage in ("ib_gl", "gr_cl"):
    for r in doc[f"{stage}_metrics"] or []:
        if "loss" in r:
            print(stage, {k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()
                          if k in ("step", "loss", "tokens_per_s", "tflops", "mfu", "peak_mem_gib", "step_time_s",
                                   "dev_recall@10", "first_step_s")})
EOF
}

echo "lbr-ray GPU suite: $(date -u), smoke=$SMOKE, python=$PY, out=$OUT"
if [[ $INSTALL == 1 ]]; then
  export -f install_bundle && export PY WORK BUNDLE ROOT
  phase install 150 bash -c install_bundle
  export PYTHONPATH=$ROOT:$WORK/site PATH=$WORK/site/bin:$PATH
fi
record_env
LBR=("$PY" -m cli.main)
[[ $INSTALL == 1 ]] && command -v lbr >/dev/null && LBR=(lbr)
MODEL=$WORK/model
"$PY" benchmarks/attention.py --preset "$PRESET" --save-model "$MODEL"

phase train 240 "${LBR[@]}" train --stage all --config benchmarks/gpu_suite.yaml --output "$WORK/run" \
  --set "model.name=$MODEL" "${RUN_SET[@]}" "${TRAIN_SET[@]}"
rm -rf "$WORK"/run/*/checkpoint_*  # 8 GB each at 0.5B (DeepSpeed's fp32 master weights and Adam moments)
phase eval 90 "${LBR[@]}" eval --model "$WORK/run" --domains medical,biology --data-root data/demo --num-workers 1 \
  "$GPU" "${EVAL_CAP[@]}" --cache-dir "$WORK/cache" --output "$WORK/eval"
collect_train
phase overhead 120 "$PY" benchmarks/overhead.py --config benchmarks/gpu_suite.yaml --set "model.name=$MODEL" \
  "${RUN_SET[@]}" --lbr-run "$WORK/run" "${OVERHEAD[@]}" --out "$OUT/overhead.json"
phase fused_ce 45 "$PY" benchmarks/fused_ce.py --device "$DEVICE" "${FUSED[@]}" --out "$OUT/fused_ce.json"
phase gradcache 90 "$PY" benchmarks/gradcache.py --config benchmarks/gpu_suite.yaml --set "model.name=$MODEL" \
  "${RUN_SET[@]}" --workers 1 --device "$DEVICE" "${GRADCACHE[@]}" --out "$OUT/gradcache.json"
phase backends 120 "$PY" benchmarks/attention.py --preset "$PRESET" --device "$DEVICE" "${BACKENDS[@]}" \
  --out "$OUT/backends.json"  # last: it writes every row as it goes, so the deadline cuts only its last rows

# the run's logs, metrics and reports (no weights, checkpoints or caches); without Ray's session logs if too big
tar_logs() { tar czf "$OUT/logs.tar.gz" -C "$WORK" "$@" --exclude='checkpoint_*' --exclude=model --exclude=cache \
  --exclude=site --exclude=wheels --exclude='*.safetensors' --exclude='*.pt' run eval 2>/dev/null; }
tar_logs --dereference
(($(stat -c %s "$OUT/logs.tar.gz") > 15000000)) && tar_logs
echo "suite done in $(($(date +%s) - START)) s; files in $OUT:"
ls -l "$OUT"
"$PY" - "$OUT" <<'EOF'  # the headline numbers last (the call's reply carries the end of the output)
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
def load(name):
    try:
        return json.loads((out / name).read_text())
    except (OSError, ValueError):
        return {}
for line in (out / "timings.jsonl").read_text().splitlines():
    print(line)
for stage in ("ib_gl", "gr_cl"):
    rows = [r for r in load("train.json").get(f"{stage}_metrics") or [] if "loss" in r]
    if rows:
        print(stage, {k: round(v, 4) for k, v in rows[-1].items() if k in ("tokens_per_s", "mfu", "peak_mem_gib")})
o = load("overhead.json")
print("step time vs plain loop:", o.get("step_time_ratio_vs_plain"))
for r in load("fused_ce.json").get("rows", []):
    print("fused_ce", {k: r.get(k) for k in ("method", "rows", "fwd_bwd_ms", "peak_extra_mib", "error")})
for r in load("gradcache.json").get("table", []):
    print("gradcache", {k: round(v, 2) if isinstance(v, float) else v for k, v in r.items()})
for r in load("backends.json").get("rows", []) + load("backends.json").get("packing", []):
    print("backends", {k: r.get(k) for k in ("backend", "layout", "seq_len", "tokens_per_s", "mfu", "error")})
EOF
exec >&- 2>&-
wait "$TEE"

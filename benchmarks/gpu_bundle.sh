#!/usr/bin/env bash
# Builds .gpu_bundle/: what benchmarks/gpu_suite.sh needs that the GPU machine's image lacks (it has Python 3.12,
# torch, transformers, peft, triton, pyarrow, pandas, numpy, typer, ...; no network), as cp312 manylinux x86_64
# wheels, in at most ~35 MiB so that it travels next to the tree within the 64 MiB a call may carry:
#
#   wheels/*.whl          Ray's and DeepSpeed's missing dependencies, bm25s (`lbr train` ends with BM25's dev R@10
#                         next to the model's), liger-kernel (all at the versions this project's CPU venv runs;
#                         pure Python but pydantic-core and rpds-py)
#   ray-*.whl.xz          Ray, slimmed (below) and repacked as a valid wheel (RECORD rewritten), stored uncompressed
#                         and then xz-compressed as a whole (Ray's three ELF binaries compress far better solid)
#   deepspeed-*.tar.gz    DeepSpeed's sdist, built there with DS_BUILD_OPS=0 against the image's torch
#
# Left out of Ray (not used by ray[train,tune,data] at run time): the Java jars (33 MiB), the dashboard's web
# client build (9 MiB; lbr starts Ray without the dashboard), RLlib, Serve and ray.llm. faiss-cpu (18 MiB) is left
# out too: `lbr eval` searches with numpy's exact top-k when FAISS is missing (lbr_ray/eval/index.py).
#
#   bash benchmarks/gpu_bundle.sh                            # -> .gpu_bundle/, prints its size
#   PYVER=3.11 bash benchmarks/gpu_bundle.sh /tmp/bundle311  # the same for CPython 3.11: a rehearsal on this
#                                                            # machine (gpu_suite.sh --cpu-smoke --install)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}  # needs pip and the `wheel` package
PYVER=${PYVER:-3.12}  # the GPU machine's python3
RAY=ray==2.60.0
DEEPSPEED=deepspeed==0.19.8
WHEELS=(pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
        typing_extensions==4.16.0 jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0
        rpds-py==2026.9.1 tensorboardX==2.6.5 hjson==3.1.0 liger-kernel==0.8.5 bm25s==0.3.16)

download() {  # download DEST PYVER SPEC...: binary wheels for CPython PYVER on manylinux x86_64, no dependencies
  local dest=$1 pyver=$2; shift 2
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$pyver" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
    -d "$dest" "$@"
}

slim_ray() {  # slim_ray WHEEL OUT.whl: Ray's wheel without what ray[train,tune,data] never loads, stored, RECORD fixed
  "$PY" - "$1" "$2" <<'EOF'
import shutil, sys, tempfile, zipfile
from pathlib import Path
from wheel.wheelfile import WheelFile

DROP = ("ray/jars/", "ray/dashboard/client/", "ray/rllib/", "ray/serve/", "ray/llm/")
src, dst = sys.argv[1], Path(sys.argv[2])
with tempfile.TemporaryDirectory() as tmp, zipfile.ZipFile(src) as whl:
    keep = [n for n in whl.namelist() if not n.startswith(DROP) and not n.endswith(".dist-info/RECORD")]
    whl.extractall(tmp, keep)
    for info in whl.infolist():  # zipfile drops the executable bits (raylet, gcs_server)
        if info.filename in keep and info.external_attr >> 16 & 0o111:
            (Path(tmp) / info.filename).chmod(info.external_attr >> 16 & 0o777)
    dst.unlink(missing_ok=True)
    with WheelFile(dst, "w", compression=zipfile.ZIP_STORED) as out:  # writes a fresh RECORD
        out.write_files(tmp)
print(f"{dst.name}: kept {len(keep)} of {len(whl.namelist())} files")
EOF
}

OUT=${1:-$ROOT/.gpu_bundle}
rm -rf "$OUT" && mkdir -p "$OUT/wheels"
tmp=$(mktemp -d) && trap 'rm -rf "$tmp"' EXIT
download "$OUT/wheels" "$PYVER" "${WHEELS[@]}"
download "$tmp" "$PYVER" "$RAY"
ray_whl=$(basename "$tmp"/ray-*.whl)
mkdir "$tmp/slim" && slim_ray "$tmp/$ray_whl" "$tmp/slim/$ray_whl"
xz -T0 -6 -c "$tmp/slim/$ray_whl" >"$OUT/$ray_whl.xz"
"$PY" -m pip download -q --no-deps --no-binary=:all: -d "$OUT" "$DEEPSPEED"
echo "ray wheel: $(du -m "$tmp/$ray_whl" | cut -f1) MiB as released, $(du -m "$tmp/slim/$ray_whl" | cut -f1) MiB" \
     "slimmed and stored, $(du -m "$OUT/$ray_whl.xz" | cut -f1) MiB xz-compressed"
(cd "$OUT" && ls -l --block-size=K -- *.xz *.tar.gz wheels/*.whl | awk '{print $5, $9}')
echo "bundle: $(du -sb "$OUT" | awk '{printf "%.1f MiB", $1 / 1048576}') in $OUT"

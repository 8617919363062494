#!/usr/bin/env bash
# One of issue 38's training routes on a lent GPU, in one device call: render the shapes splits, train a recipe
# with --gpu for at most TRAIN_S seconds, then the geometry check (one sample, the test split) on what it exported,
# and bring back the export, its history and the check (at most 8 files: the `run` tool's limit).
#
#     benchmarks/device_bundle.sh        # here, once: Ray (with Train), pydantic, ... for a machine without them
#     run carry=[".devpkgs"] timeout_s=560:
#       TRAIN_S=330 bash docs/experiments/device_train.sh docs/experiments/gan-attributes.yaml gan
#       TRAIN_S=330 bash docs/experiments/device_train.sh docs/experiments/transformer-6000.yaml transformer
# ROWS=N renders N training rows instead of 60,000 (the "more data" route).
#
# A run cut by TRAIN_S is checked at its last checkpoint (`checkpoint_every` in the recipe). On the 2-core machine
# (no GPU, a smoke check of this script): SMOKE=1 bash docs/experiments/device_train.sh CONFIG KIND
set -euo pipefail
cfg=$1 kind=$2
OUT=${OUT:-/tmp/device_train_out}
TRAIN_S=${TRAIN_S:-330}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
if ! python3 -c "import ray.train, pydantic, safetensors" 2>/dev/null; then
  tar -xJf .devpkgs/site.tar.xz -C /tmp && export PYTHONPATH=/tmp/site:$PWD
fi
pm() { python3 -m promptmill.jobs.cli "$@"; }
rows=${ROWS:-60000} test_rows=2000 gpu=(--gpu) extra=() n=1000
if [ -n "${SMOKE:-}" ]; then  # tiny: the script's path, not a result (SMOKE_STEPS with a short TRAIN_S: the cut)
  rows=512 test_rows=64 gpu=() extra=(--steps "${SMOKE_STEPS:-4}" --checkpoint-every 50 --max-rows 512) n=32
fi
work=$(mktemp -d)
pm dataset shapes --rows "$rows" --split train --out "$work/train"
pm dataset shapes --rows "$test_rows" --split test --out "$work/test"
name=$(basename "$cfg" .yaml)
t0=$(date +%s)
# the run's own embedded Ray; cut at TRAIN_S, its last checkpoint is what gets checked
timeout --signal=INT "$TRAIN_S" python3 -m promptmill.jobs.cli train "$kind" --config "$cfg" --data "$work/train" \
  --out "$work/export" --storage-path "$work/ray" --name "$name" "${gpu[@]}" "${extra[@]}" \
  > "$OUT/train.log" 2>&1 || echo "train: stopped at TRAIN_S=$TRAIN_S or failed (train.log)"
echo "train: $(( $(date +%s) - t0 )) s"
export_dir="$work/export"
if [ ! -f "$export_dir/model.safetensors" ]; then  # cut: the newest checkpoint's export
  export_dir=$(ls -d "$work"/ray/"$name"/checkpoint_*/export 2>/dev/null | sort | tail -1)
fi
[ -n "$export_dir" ] || { echo "no checkpoint was written"; tail -30 "$OUT/train.log"; exit 1; }
cp "$export_dir/config.json" "$export_dir/model.safetensors" "$OUT/"
python3 - "$export_dir/.." "$OUT/history.json" <<'EOF'
import json, pathlib, sys
meta = pathlib.Path(sys.argv[1]) / "meta.json"  # a checkpoint's; the final export has training/history.json
hist = pathlib.Path(sys.argv[1]) / "export" / "training" / "history.json"
src = meta if meta.exists() else hist
pathlib.Path(sys.argv[2]).write_text(src.read_text() if src.exists() else json.dumps({"missing": str(src)}))
EOF
other=$([ "$kind" = gan ] && echo --transformer || echo --gan)
flag=$([ "$kind" = gan ] && echo --gan || echo --transformer)
pm eval-models --test "$work/test" "$flag" "$export_dir" "$other" /nonexistent --vq /nonexistent --clip /nonexistent \
  -n "$n" --diversity-n 50 --rerank '' --grid-dir "$OUT" > "$OUT/eval.log" 2>&1 || { tail -30 "$OUT/eval.log"; exit 1; }
grep -E "^$kind (sampling|prompt-match|geometry check|4 seeds)" "$OUT/eval.log"

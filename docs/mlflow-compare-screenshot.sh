#!/usr/bin/env bash
# Screenshot of MLflow's compare view of two training runs (docs/images/mlflow-compare.png), taken with headless
# Chromium (Debian: apt-get install chromium) against a local MLflow server on the workspace's mlflow.db.
# Usage (repo root, .venv active): bash docs/mlflow-compare-screenshot.sh RUN_ID_A RUN_ID_B [EXPERIMENT_ID] [OUT.png]
# (run ids: the training runs, tags.ditpipe.stage = 'train', e.g. the default run and one with another model.size)
set -euo pipefail
a=$1 b=$2 exp=${3:-1} out=${4:-docs/images/mlflow-compare.png}
mlflow server --backend-store-uri "sqlite:///$PWD/mlflow.db" --host 127.0.0.1 --port 5055 >/dev/null 2>&1 &
server=$!
trap 'kill $server' EXIT
for _ in $(seq 60); do curl -sf -o /dev/null http://127.0.0.1:5055/health && break; sleep 1; done
url="http://127.0.0.1:5055/#/compare-runs?runs=%5B%22$a%22,%22$b%22%5D&experiments=%5B%22$exp%22%5D"
shot=$(mktemp --suffix=.png)
chromium --headless=new --no-sandbox --disable-gpu --hide-scrollbars --window-size=1500,2400 \
  --virtual-time-budget=30000 --screenshot="$shot" "$url" 2>/dev/null
# keep the compare view: drop the assistant panel on the right and the page below the first metrics
python -c "import sys; from PIL import Image; Image.open(sys.argv[1]).crop((0, 0, 1112, 2030)).save(sys.argv[2], optimize=True)" \
  "$shot" "$out"
echo "wrote $out"

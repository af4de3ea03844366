#!/usr/bin/env bash
# Pretrain the anchor VLM on one GPU inside one device call (issue 12), then measure its three figures.
# The LR schedule follows the clock (--train-seconds BUDGET), so the run anneals within the call; the steps
# it reached are logged. Outputs in $OUT: the checkpoint folder (and TensorBoard logs) as a tar split in
# 15 MB parts, eval.json, metrics.jsonl, loss.png, pretrain_config.json, pretrain.log.
# Usage on the device machine: BUDGET=420 bash pipelines/anchor_pretrain.sh (the data ship in the package;
# DATA=<folder> reads another copy; EXTRA="--init <checkpoint> ..." continues from a checkpoint)
set -euo pipefail
export PYTHONPATH=$PWD/packages PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false TQDM_MININTERVAL=20
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True  # shapes change every step
OUT=${OUT:-/tmp/out}; RUN=${RUN:-/tmp/anchor}; BUDGET=${BUDGET:-420}; SEED=${SEED:-0}
mkdir -p "$OUT"
(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || echo "no GPU") | tee "$OUT/pretrain.log"
python3 -m rot_anchor.cli pretrain --out "$RUN" ${DATA:+--data-dir "$DATA"} --steps 100000 --train-seconds "$BUDGET" --no-evaluate \
    --workers "${WORKERS:-12}" --seed "$SEED" ${EXTRA:-} >> "$OUT/pretrain.log" 2>&1 || echo "pretraining failed: see pretrain.log"
grep -E "resuming|anchor pretraining:|rror|Traceback" "$OUT/pretrain.log" | grep -v "step/s" | tail -20
tar -C "$RUN" -cf - model tensorboard | split -b 15M - "$OUT/anchor.tar.part-"
cp "$RUN"/{metrics.jsonl,loss.png,pretrain_config.json} "$OUT/"
# a quick look on EVAL_LIMIT rows per set (the full figures: rot-anchor evaluate on the returned checkpoint)
timeout "${EVAL_SECONDS:-90}" python3 -m rot_anchor.cli evaluate "$RUN/model" ${DATA:+--data-dir "$DATA"} --limit "${EVAL_LIMIT:-200}" \
    --out "$OUT/eval-quick.json" 2>&1 | grep -E "^reading|^cot from|^answer from|rror" || echo "quick evaluation did not finish"
python3 - "$RUN/metrics.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
for r in rows[:: max(1, len(rows) // 12)] + rows[-1:]:
    print(r["step"], f"{r['steps_per_s']:.2f} steps/s lr {r['lr']:.2e}", " ".join(f"{k[5:]} {v:.4f}" for k, v in r.items() if k.startswith("loss/")))
PY

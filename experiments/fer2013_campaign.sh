#!/usr/bin/env bash
# The FER2013 training campaign of the default model (issue 22, MODEL.md): one schedule
# planned for the whole run, 70 epochs of cosine with warm restarts (cycles end, annealed,
# after epochs 10, 30 and 70), continued across sessions.
#
#   experiments/fer2013_campaign.sh STOP     # train until epoch STOP (a cycle end to ship)
#
# Every epoch leaves a checkpoint (weights, optimizer, epoch = schedule position, RNG) in
# $CACHE/train/$RUN, outside the work tree; a later call on the same machine resumes it with
# the same schedule. On a new machine (no checkpoints there) the campaign goes on from the
# shipped model: its weights, a new optimizer, and the schedule after the epoch it reached
# (--start-epoch, read from the model's own train_config). The model of epoch STOP, scored
# and calibrated, is written to $CACHE/$RUN-eSTOP/model.pt.
set -euo pipefail
cd "$(dirname "$0")/.."
STOP=${1:?usage: $0 STOP_EPOCH (10, 30 or 70 end a cycle)}
CACHE=${FER_BATCH_CACHE:-$HOME/.cache/fer-batch}
RUN=fer2013-restarts70
EPOCHS=70
CONTINUE=()
if [ -d "$CACHE/train/$RUN" ]; then
  CONTINUE=(--resume-from "$CACHE/train/$RUN")
else
  SHIPPED=$(.venv/bin/python - "$RUN" "$EPOCHS" <<'PY'
import sys
from fer_batch.config import DEFAULT_MODEL
from fer_batch.model import read_checkpoint
cfg = read_checkpoint(open(DEFAULT_MODEL, "rb").read(), DEFAULT_MODEL)["train_config"]
same = cfg.get("run_name") == sys.argv[1] and cfg.get("epochs") == int(sys.argv[2])
print(cfg.get("stop_after") or cfg["epochs"] if same else 0)
PY
)
  [ "$SHIPPED" -gt 0 ] || { echo "the shipped model is not of campaign $RUN" >&2; exit 2; }
  echo "no checkpoints in $CACHE/train/$RUN: going on from the shipped model (epoch $SHIPPED)"
  CONTINUE=(--start-epoch "$SHIPPED")
fi
exec .venv/bin/fer-batch train ../shared/fer2013/train --test-data ../shared/fer2013/val \
  --pretrained default --epochs "$EPOCHS" --schedule restarts --stop-after "$STOP" \
  --lr 1e-3 --batch-size 128 --optimizer adamw --weight-decay 0.05 --label-smoothing 0.1 \
  --augment --calibration-fraction 0.05 \
  --storage-path "$CACHE/train" --run-name "$RUN" \
  --output "$CACHE/$RUN-e$STOP" "${CONTINUE[@]}"

#!/usr/bin/env bash
# LoRA of the real Gemma 3 270M on the iu-cxr-findings train split, evaluated before and after on the
# disjoint held-out split (396 reports at seed 0), then the paired comparison and an HTML report.
# CPU only, offline. See docs/finetune.md for the measured figures and what each step does.
#
#   examples/finetune_iu_cxr.sh                       # the full run (STEPS=40 training steps)
#   STEPS=2 LIMIT=4 TRAIN_LIMIT=8 examples/finetune_iu_cxr.sh   # a smoke run of the whole flow (minutes)
set -euo pipefail

OUT=${OUT:-runs/iu-cxr-finetune}
STEPS=${STEPS:-40}            # optimizer steps of LoRA training
LIMIT=${LIMIT:-}               # held-out reports evaluated (empty: all of them)
TRAIN_LIMIT=${TRAIN_LIMIT:-}   # training reports used (empty: all of the train split)
MEDLENS=${MEDLENS:-medlens}
PYTHON=${PYTHON:-python}
mkdir -p "$OUT"

# 1. The held-out benchmark: the built-in iu-cxr-findings file with the loader's split set to held_out
#    (same prompt, same parser; the split is seeded and by report text, see medlens/eval/iu_cxr.py).
"$PYTHON" - "$OUT/iu-cxr-findings-heldout.yaml" <<'PY'
import sys
from pathlib import Path

import yaml

from medlens.eval.registry import benchmark_files

spec = yaml.safe_load(benchmark_files()["iu-cxr-findings"].read_text())
spec["options"].setdefault("loader_options", {})["split"] = "held_out"
Path(sys.argv[1]).write_text(yaml.safe_dump(spec, sort_keys=False))
PY

limit=()
[[ -n "$LIMIT" ]] && limit=(--limit "$LIMIT")
train_limit=()
[[ -n "$TRAIN_LIMIT" ]] && train_limit=("data.limit=$TRAIN_LIMIT")

# 2. Before: the base model on the held-out reports.
"$MEDLENS" eval -b "$OUT/iu-cxr-findings-heldout.yaml" -m gemma-3-270m --device cpu "${limit[@]}" -o "$OUT/eval-base"

# 3. LoRA on the train split (the overlap guard runs against the held-out split first).
"$MEDLENS" finetune gemma-270m-cpu "output.dir=$OUT/finetune" "train.max_steps=$STEPS" "${train_limit[@]}"

# 4. After: the same model with the adapter, on the same reports.
"$MEDLENS" eval -b "$OUT/iu-cxr-findings-heldout.yaml" -m gemma-3-270m --device cpu --adapter "$OUT/finetune/adapter" \
  "${limit[@]}" -o "$OUT/eval-tuned"

# 5. Paired bootstrap + McNemar, and the report.
"$MEDLENS" compare "$OUT/eval-base" "$OUT/eval-tuned" | tee "$OUT/compare.txt"
"$MEDLENS" report "$OUT/eval-base" "$OUT/eval-tuned" -o "$OUT/report.html"
echo "report: $OUT/report.html"

#!/usr/bin/env bash
# The router study of docs/routers.md: every rule against softmax top-2 at equal active parameters,
# 3 seeds, the same tokens. Decoders on the built-in corpus (500k tokens per run), encoders on MLM.
# Usage: bash docs/routers/run_study.sh OUT_DIR   (63 minutes on 2 CPU cores at load average 8-19;
# the two compares can run side by side)
set -euo pipefail
out=${1:?give an output folder}
S=docs/routers/study
mkdir -p "$out"
{ lscpu | grep 'Model name'; echo "start: $(date -u +%FT%TZ) $(uptime)"; } > "$out/machine.txt"
python -m moelab compare --models $S/topk.toml,$S/hash.toml,$S/sbase.toml,$S/reinforce.toml,$S/remoe.toml,$S/hetero.toml,$S/groups.toml \
    --seeds 3 --budget 500k --set train.batch_size=32 --out "$out/decoders" --no-progress
echo "decoders done: $(date -u +%FT%TZ) $(uptime)" >> "$out/machine.txt"
python -m moelab compare --models $S/bert-topk.toml,$S/bert-ec.toml \
    --seeds 3 --budget 500k --set train.batch_size=32 --out "$out/encoders" --no-progress
echo "encoders done: $(date -u +%FT%TZ) $(uptime)" >> "$out/machine.txt"
python docs/routers/study_table.py "$out/decoders" sbase:reinforce sbase:hash hash:reinforce remoe:sbase > "$out/decoders/table.md"
python docs/routers/study_table.py "$out/encoders" > "$out/encoders/table.md"

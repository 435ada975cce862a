#!/usr/bin/env bash
# lora-runner against the PyTorch + PEFT + TRL peer, interleaved in one run.
#
# Each repetition runs lora-runner's SFT, DPO scheme one, the merge and DPO
# scheme two (each stage its own process on a fresh cache, so each has its
# own peak RSS and wall time, reference pass included), then the peer's six
# runs (TRL and plain loops), A B A B. scripts/bench_vs_peer.py prints the
# medians and the ratios. Not part of CI.
#
# Needs the peer set up as in ../shared/peer-bench/README.md (a venv outside
# the repository, its models/ and data/ made, its scripts in
# $PEER_ROOT/scripts/).
#
#   PEER_ROOT=$HOME/peer REPS=3 scripts/bench-vs-peer.sh
#
# Env: REPS (3), OUT (target/bench-vs-peer), PEER_JOBS (the peer's runs,
# default all six), GENERIC=1 adds an SFT run per repetition on the generic
# ops a GPU takes (LORA_RUNNER_GENERIC_OPS=1), THREADS (2).
set -euo pipefail
cd "$(dirname "$0")/.."
: "${PEER_ROOT:?set PEER_ROOT to the peer set-up (../shared/peer-bench/README.md)}"
REPS=${REPS:-3}
OUT=${OUT:-target/bench-vs-peer}
THREADS=${THREADS:-2}
PEER_JOBS=${PEER_JOBS:-sft sft_plain dpo1 dpo2 dpo_plain1 dpo_plain2}
mkdir -p "$OUT/logs"
OUT=$(cd "$OUT" && pwd)

cargo build --release --quiet --bin runner
RUNNER=$PWD/target/release/runner

# The peer's settings (its README): f32, LoRA r 16 / α 32 on all seven
# projections, dropout 0, AdamW without weight decay, constant LR, clipping
# at 1.0, sequences ≤ 256 tokens keeping their start; SFT micro-batch 4 for
# 30 steps at lr 2e-4; DPO 2 pairs a step for 20 steps at lr 5e-5, β 0.1
# sigmoid; scheme two a fresh LoRA r 8 / α 16 on the merged model.
cat > "$OUT/recipe.toml" <<EOF
[recipe]
name = "bench-vs-peer"
seed = 0

[defaults.sft]
train = { steps = 30, batch = 4, lr = 2e-4, schedule = "constant", seq_len = 256, overlong = "truncate_right" }

[defaults.dpo]
train = { steps = 20, batch = 2, lr = 5e-5, schedule = "constant", seq_len = 256, overlong = "truncate_right" }
dpo = { beta = 0.1, loss = "sigmoid" }

[stages.base]
kind = "base"
path = "$PEER_ROOT/models/bench"

[stages.sft]
kind = "sft"
model = "base"
data = { train = "$PEER_ROOT/data/sft.jsonl" }
lora = { r = 16, alpha = 32, targets = "all-linear" }

[stages.dpo_continued]
kind = "dpo"
model = "base"
adapter = "sft"
data = { train = "$PEER_ROOT/data/dpo.jsonl" }

[stages.merged]
kind = "merge"
model = "base"
adapter = "sft"

[stages.dpo_fresh]
kind = "dpo"
model = "merged"
lora = { r = 8, alpha = 16, targets = "all-linear" }
data = { train = "$PEER_ROOT/data/dpo.jsonl" }
EOF

runner_stage() { # tag cache stage [env...]
  local tag=$1 cache=$2 stage=$3
  shift 3
  env RAYON_NUM_THREADS="$THREADS" "$@" /usr/bin/time -v -o "$OUT/logs/${tag}.time" \
    "$RUNNER" --cache "$cache" run "$OUT/recipe.toml" --only "$stage" --threads "$THREADS" \
    > "$OUT/logs/${tag}.log" 2>&1
  "$RUNNER" --cache "$cache" show "$OUT/recipe.toml" "$stage" --json > "$OUT/logs/${tag}.show.json"
  echo "  lora-runner $stage: $(tail -n 2 "$OUT/logs/${tag}.log" | head -n 1)"
}

for rep in $(seq 1 "$REPS"); do
  echo "== rep $rep: lora-runner"
  cache="$OUT/cache-rep$rep"
  rm -rf "$cache"
  "$RUNNER" --cache "$cache" run "$OUT/recipe.toml" --only base > "$OUT/logs/base_rep$rep.log" 2>&1
  for stage in sft dpo_continued merged dpo_fresh; do
    runner_stage "runner_${stage}_rep$rep" "$cache" "$stage"
  done
  if [ "${GENERIC:-0}" = 1 ]; then
    rm -rf "$cache-generic"
    "$RUNNER" --cache "$cache-generic" run "$OUT/recipe.toml" --only base > /dev/null 2>&1
    runner_stage "runner_generic_sft_rep$rep" "$cache-generic" sft LORA_RUNNER_GENERIC_OPS=1
  fi
  echo "== rep $rep: the peer"
  (
    cd "$PEER_ROOT"
    # shellcheck disable=SC1091
    . venv/bin/activate
    export OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS TOKENIZERS_PARALLELISM=false \
      HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 PEER_ROOT
    mkdir -p runs/logs
    for job in $PEER_JOBS; do
      case $job in
        sft) cmd="python scripts/bench_sft.py" ;;
        sft_plain) cmd="python scripts/bench_sft_plain.py" ;;
        dpo1) cmd="python scripts/bench_dpo.py 1" ;;
        dpo2) cmd="python scripts/bench_dpo.py 2" ;;
        dpo_plain1) cmd="python scripts/bench_dpo_plain.py 1" ;;
        dpo_plain2) cmd="python scripts/bench_dpo_plain.py 2" ;;
        *) echo "unknown peer job $job" >&2; exit 2 ;;
      esac
      RUN_TAG="_rep${rep}" /usr/bin/time -v -o "runs/logs/${job}_rep${rep}.time" $cmd \
        > "runs/logs/${job}_rep${rep}.log" 2>&1
      echo "  peer $job: $(grep -E '^\[(sft|dpo)' "runs/logs/${job}_rep${rep}.log" | head -1)"
    done
  )
done

python3 scripts/bench_vs_peer.py "$OUT" "$PEER_ROOT" "$REPS"

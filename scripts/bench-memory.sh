#!/usr/bin/env bash
# Peak memory and speed of one SFT step on a Qwen2-0.5B-shaped `init` model
# (hidden 896, 24 layers, 14/2 heads, FFN 4864, vocab 151936, tied), batch 1,
# LoRA r 16 on all seven projections: each precision (f32, bf16, q8_0, q4_k, fp8)
# at each sequence length, with and without activation checkpointing.
#
# Each measured process runs only the SFT stage (`--only sft --force sft`,
# the base made beforehand) under /usr/bin/time; the table gives its peak
# RSS, `runner plan`'s estimate for the stage, and the step's tokens/s.
# Not part of CI: several minutes and ~12 GB of memory at seq 2048.
#
#   scripts/bench-memory.sh                      # all of it
#   SEQS="512" CONFIGS="f32 q4_k" scripts/bench-memory.sh
#   LORA_RUNNER_GENERIC_OPS=1 scripts/bench-memory.sh   # the GPU's code path
#   INIT='{ arch = "qwen2", hidden = 256, layers = 4, heads = 4, kv_heads = 2, ffn = 512, vocab = 1000 }' \
#     SEQS=8192 scripts/bench-memory.sh          # another shape
# The runner keeps freed blocks under 32 MiB for speed (cli/process.rs), which
# adds allocator slack to the peak, more on the GPU path (many 1-32 MiB
# intermediates); GLIBC_TUNABLES=glibc.malloc.mmap_threshold=1048576 maps every
# block from 1 MiB, so the peak is nearer the live tensors (and steps slower).
set -euo pipefail
cd "$(dirname "$0")/.."
RUNNER=${RUNNER:-target/release/runner}
OUT=${OUT:-target/bench-memory}
SEQS=${SEQS:-"512 2048"}
CONFIGS=${CONFIGS:-"f32 bf16 q8_0 q4_k"}
CHECKPOINTING=${CHECKPOINTING:-"false true"}
INIT=${INIT:-'{ arch = "qwen2", hidden = 896, layers = 24, heads = 14, kv_heads = 2, ffn = 4864, vocab = 151936 }'}
[ -x "$RUNNER" ] || cargo build --release
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export RUNNER_CACHE="$OUT/cache"

# One row longer than the longest sequence: letters, seeded.
longest=0
for s in $SEQS; do [ "$s" -gt "$longest" ] && longest=$s; done
awk -v n=$((longest + 64)) 'BEGIN { srand(7); p = ""; for (i = 0; i < n; i++) p = p substr("abcdefghij", int(rand() * 10) + 1, 1);
  printf("{\"prompt\": \"%s\", \"completion\": \"%s\"}\n", substr(p, 1, n - 48), substr(p, n - 47)) }' >"$OUT/row.jsonl"

recipe() { # precision seq checkpointing
  local quantize=none dtype=f32
  case $1 in bf16) dtype=bf16 ;; q8_0 | q4_k | fp8) quantize=$1 ;; esac
  cat <<EOF
[recipe]
name = "memory"
seed = 0

[stages.base]
kind = "base"
init = $INIT
quantize = "$quantize"

[stages.sft]
kind = "sft"
model = "base"
dtype = "$dtype"
data = { train = "$OUT/row.jsonl" }
lora = { r = 16, alpha = 32, targets = "all-linear" }
train = { steps = 1, batch = 1, lr = 1e-4, seq_len = $2, schedule = "constant", checkpointing = $3 }
EOF
}

printf '%-6s %5s %5s %10s %10s %8s %8s\n' precision seq ckpt peak_GiB plan_GiB ratio tok/s
for seq in $SEQS; do
  for config in $CONFIGS; do
    for ckpt in $CHECKPOINTING; do
      r="$OUT/$config-$seq-$ckpt.toml"
      recipe "$config" "$seq" "$ckpt" >"$r"
      "$RUNNER" run "$r" --until base >/dev/null 2>&1
      estimate=$("$RUNNER" plan "$r" --json | python3 -c '
import json, sys
s = [s for s in json.load(sys.stdin)["stages"] if s["name"] == "sft"][0]
print(s.get("memory", {}).get("estimate_bytes", 0) / 2**30)')
      if ! /usr/bin/time -f '%M' -o "$OUT/time" "$RUNNER" run "$r" --only sft --force sft >"$OUT/log" 2>&1; then
        # Killed (out of memory) or failed: say so and go on.
        printf '%-9s %5s %5s %10s %10.2f %8s %8s\n' "$config" "$seq" "$ckpt" "failed" "$estimate" - -
        continue
      fi
      peak=$(awk '/^[0-9]+$/ { printf("%.2f", $1 / 1048576) }' "$OUT/time")
      artifact=$("$RUNNER" show "$r" sft --json | python3 -c 'import json, sys; print(json.load(sys.stdin)["path"])')
      # From the artifact's timings: a rerun whose result is byte-identical
      # keeps the first run's artifact, so this is the first run's figure;
      # time repetitions with /usr/bin/time's wall instead.
      tps=$(python3 -c '
import json, sys
lines = [json.loads(l) for l in open(sys.argv[1]) if "tokens_per_s" in l]
print(round(lines[-1]["tokens_per_s"]))' "$artifact/timings.jsonl")
      ratio=$(python3 -c "print(f'{$estimate / $peak:.2f}' if $peak else '-')")
      printf '%-9s %5s %5s %10s %10.2f %8s %8s\n' "$config" "$seq" "$ckpt" "$peak" "$estimate" "$ratio" "$tps"
    done
  done
done

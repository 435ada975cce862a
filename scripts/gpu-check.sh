#!/usr/bin/env bash
# The GPU checks, as one prepared script for a machine with an NVIDIA GPU and the CUDA
# binary (scripts/build-cuda.sh; at run time it needs libcuda, cudart, cublas and curand 13,
# e.g. LD_LIBRARY_PATH pointing at PyTorch's nvidia/cu13/lib):
#   1. f32 logits on the GPU against the CPU for the same weights (tolerance 1e-3);
#   2. the demo recipe in bf16 on the GPU, with its learning metrics;
#   3. SFT and DPO tokens/s and peak GPU memory on a Qwen2-0.5B-shaped `init` model
#      (hidden 896, 24 layers, 14 heads, 2 KV heads, FFN 4864, vocab 151936, seq 512,
#      LoRA r 16 on all seven projections);
#   4. long sequences on the same shape: one SFT stage of 3 steps, batch 1, bf16, at 2048
#      tokens (checkpointing off and on) and 8192 (on), each its own process with its own
#      peak GPU memory and tokens/s: what the tiled attention and the chunked head need.
# Prints one table. DEVICE=cpu SHAPE=tiny runs the same steps on a CPU, small, to try the script.
# On a GPU machine: RUNNER_BIN=target/cuda/runner (from scripts/build-cuda.sh) \
#   LD_LIBRARY_PATH=<PyTorch's nvidia/cu13/lib> bash scripts/gpu-check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
runner="${RUNNER_BIN:-target/release/runner}"
device="${DEVICE:-cuda:0}"
out="${OUT:-$(mktemp -d)}"
mkdir -p "$out"
metric() { # manifest metric of a stage: metric RECIPE STAGE KEY
  "$runner" --cache "$out/cache" show "$1" "$2" --json |
    python3 -c "import json,sys; print(json.load(sys.stdin)['manifest']['metrics'].get('$3', 'n/a'))"
}

# 1. Logits.
logits=$("$runner" --device "$device" selftest | tail -1)

# 2. The demo in bf16.
sed 's/^seed = 17$/seed = 17\ndtype = "bf16"/' recipes/demo.toml > recipes/.demo-bf16.toml
trap 'rm -f recipes/.demo-bf16.toml recipes/.gpu-bench.toml' EXIT
"$runner" --cache "$out/cache" --device "$device" run recipes/.demo-bf16.toml > "$out/demo.txt" 2> "$out/demo.log"
sft_before=$(metric recipes/.demo-bf16.toml sft before/eval/loss)
sft_after=$(metric recipes/.demo-bf16.toml sft eval/loss)
pref_sft=$(metric recipes/.demo-bf16.toml eval_sft preference/accuracy)
pref_one=$(metric recipes/.demo-bf16.toml eval_continued preference/accuracy)
pref_two=$(metric recipes/.demo-bf16.toml eval_fresh preference/accuracy)

# 3. Throughput on a Qwen2-0.5B shape, with long rows (about 500 tokens).
if [ "${SHAPE:-qwen2-0.5b}" = tiny ]; then
  shape='hidden = 64, layers = 2, heads = 4, kv_heads = 2, ffn = 128, vocab = 256'; seq=128
else
  shape='hidden = 896, layers = 24, heads = 14, kv_heads = 2, ffn = 4864, vocab = 151936'; seq=512
fi
python3 - "$out" "$seq" <<'PY'
import json, random, sys
out, seq = sys.argv[1], int(sys.argv[2])
rng = random.Random(0)
words = lambda n: " ".join("".join(rng.choice("abcdefghij") for _ in range(5)) for _ in range(n))
n = max(4, seq // 6 // 2)
with open(f"{out}/sft.jsonl", "w") as f:
    for _ in range(64):
        f.write(json.dumps({"prompt": words(n), "completion": " " + words(n)}) + "\n")
with open(f"{out}/dpo.jsonl", "w") as f:
    for _ in range(64):
        f.write(json.dumps({"prompt": words(n), "chosen": " " + words(n) + "!", "rejected": " " + words(n) + "."}) + "\n")
PY
cat > recipes/.gpu-bench.toml <<TOML
[recipe]
name = "gpu-bench"
seed = 1
dtype = "bf16"
[stages.base]
kind = "base"
init = { arch = "qwen2", $shape }
dtype = "bf16"
[stages.sft]
kind = "sft"
model = "base"
data = { train = "$out/sft.jsonl" }
lora = { r = 16, alpha = 32, targets = "all-linear" }
train = { steps = 10, batch = 4, lr = 1e-4, seq_len = $seq, checkpoint_every = 0 }
[stages.dpo]
kind = "dpo"
model = "base"
adapter = "sft"
data = { train = "$out/dpo.jsonl" }
train = { steps = 10, batch = 2, lr = 1e-5, seq_len = $seq, checkpoint_every = 0 }
TOML
# Runs `runner run "$@"` while polling nvidia-smi; prints the peak memory used (MiB).
peak_of() {
  local peak_file="$out/gpu-mem.txt" poller=""
  : > "$peak_file"
  if command -v nvidia-smi > /dev/null; then
    ( while true; do nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits >> "$peak_file"; sleep 0.5; done ) &
    poller=$!
  fi
  "$runner" --cache "$out/cache" --device "$device" run "$@" > /dev/null 2>> "$out/bench.log" || echo "failed: $*" >> "$out/bench.log"
  [ -n "$poller" ] && kill "$poller"
  local peak; peak=$(sort -n "$peak_file" | tail -1)
  echo "${peak:-n/a} MiB"
}
peak_gpu=$(peak_of recipes/.gpu-bench.toml)
sft_tps=$(metric recipes/.gpu-bench.toml sft tokens_per_s)
dpo_tps=$(metric recipes/.gpu-bench.toml dpo tokens_per_s)

# 4. Long sequences, one process each (the base made once beforehand).
if [ "${SHAPE:-qwen2-0.5b}" = tiny ]; then long_seqs="128 512"; else long_seqs="2048 8192"; fi
long_max=${long_seqs##* }
python3 - "$out" "$long_max" <<'PY'
import json, random, sys
out, n = sys.argv[1], int(sys.argv[2])
rng = random.Random(1)
text = "".join(rng.choice("abcdefghij") for _ in range(n + 64))
with open(f"{out}/long.jsonl", "w") as f:
    f.write(json.dumps({"prompt": text[: n - 48], "completion": text[n - 48 :]}) + "\n")
PY
long_rows=""
"$runner" --cache "$out/cache" --device "$device" run recipes/.gpu-bench.toml --until base > /dev/null 2>> "$out/bench.log"
for long in $long_seqs; do
  for ckpt in false true; do
    [ "$long" = "$long_max" ] && [ "$ckpt" = false ] && continue
    r="recipes/.gpu-long-$long-$ckpt.toml"
    sed -n '1,/^\[stages.sft\]/p' recipes/.gpu-bench.toml | sed '$d' > "$r"
    cat >> "$r" <<TOML
[stages.sft]
kind = "sft"
model = "base"
data = { train = "$out/long.jsonl" }
lora = { r = 16, alpha = 32, targets = "all-linear" }
train = { steps = 3, batch = 1, lr = 1e-4, seq_len = $long, checkpointing = $ckpt, checkpoint_every = 0 }
TOML
    peak=$(peak_of "$r" --only sft)
    tps=$(metric "$r" sft tokens_per_s)
    long_rows="$long_rows| 4. SFT at $long tokens, checkpointing $ckpt: peak GPU memory, tokens/s | $peak, $tps |
"
    rm -f "$r"
  done
done

gpu=$(command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name --format=csv,noheader | head -1 || echo "$device")
cat <<TABLE
| check ($gpu, device $device) | result |
|---|---|
| 1. f32 logits vs CPU | $logits |
| 2. demo in bf16: SFT held-out loss | $sft_before -> $sft_after |
| 2. demo in bf16: preference accuracy after SFT / scheme one / scheme two | $pref_sft / $pref_one / $pref_two |
| 3. SFT tokens/s (${SHAPE:-qwen2-0.5b}, seq $seq, batch 4, bf16) | $sft_tps |
| 3. DPO tokens/s (batch 2 pairs) | $dpo_tps |
| 3. peak GPU memory (nvidia-smi, whole run) | $peak_gpu |
${long_rows%$'\n'}
TABLE

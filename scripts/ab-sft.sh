#!/usr/bin/env bash
# Two runner binaries on the SFT stage of the peer benchmark, interleaved
# (A B A B ...), printing each run's steady tokens/s (steps 4..N, as
# scripts/bench_vs_peer.py counts them) and the medians. For checking a
# speed change against the build before it; not part of CI.
#
#   scripts/ab-sft.sh OLD_BINARY NEW_BINARY [REPS]
#
# Needs target/bench-vs-peer/recipe.toml, which scripts/bench-vs-peer.sh
# writes (it points at the peer's model and data). Env: THREADS (2),
# OUT (target/ab-sft).
set -euo pipefail
cd "$(dirname "$0")/.."
a=$1 b=$2 reps=${3:-3}
recipe=target/bench-vs-peer/recipe.toml
[ -f "$recipe" ] || { echo "no $recipe: run scripts/bench-vs-peer.sh once" >&2; exit 2; }
out=${OUT:-target/ab-sft}
threads=${THREADS:-2}
mkdir -p "$out"
cache="$out/cache"
"$a" --cache "$cache" run "$recipe" --only base > /dev/null 2>&1

steady() { # binary
  local dir
  dir=$("$1" --cache "$cache" show "$recipe" sft --json |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["path"])')
  python3 - "$dir/timings.jsonl" <<'PY'
import json, sys
steps = {}
for line in open(sys.argv[1]):
    row = json.loads(line)
    if "tokens" in row and "elapsed_s" in row:
        steps[row["step"]] = row
n = max(steps)
tokens = sum(steps[s]["tokens"] for s in range(4, n + 1))
print(round(tokens / (steps[n]["elapsed_s"] - steps[3]["elapsed_s"]), 1))
PY
}

declare -A runs=([A]="" [B]="")
for rep in $(seq 1 "$reps"); do
  for side in A B; do
    bin=$a; [ "$side" = B ] && bin=$b
    RAYON_NUM_THREADS=$threads "$bin" --cache "$cache" run "$recipe" --only sft --force sft \
      --threads "$threads" > "$out/$side-$rep.log" 2>&1
    tps=$(steady "$bin")
    runs[$side]+="$tps "
    echo "rep $rep $side: $tps tokens/s"
  done
done
python3 - "${runs[A]}" "${runs[B]}" <<'PY'
import statistics, sys
a, b = ([float(v) for v in s.split()] for s in sys.argv[1:3])
ma, mb = statistics.median(a), statistics.median(b)
print(f"medians: A {ma:.0f}, B {mb:.0f} tokens/s; B/A {mb / ma:.2f}x")
PY

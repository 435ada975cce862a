"""Medians and ratios of one interleaved run of scripts/bench-vs-peer.sh.

usage: bench_vs_peer.py OUT PEER_ROOT REPS

Steady tokens/s counts the non-padding tokens of the trained rows over steps
4..N and divides by the wall time between the end of step 3 and the end of
step N, for both programs (the peer's definition, bench_common.py). Stage
wall time and peak RSS come from /usr/bin/time -v around each process.
"""
import json
import os
import re
import statistics
import sys

SKIP = 3
out, peer, reps = sys.argv[1], sys.argv[2], int(sys.argv[3])


def time_v(path):
    text = open(path).read()
    get = lambda key: re.search(re.escape(key) + r":\s*(.+)", text).group(1).strip()
    wall = 0.0
    for part in get("Elapsed (wall clock) time (h:mm:ss or m:ss)").split(":"):
        wall = wall * 60 + float(part)
    return {"rss_mib": int(get("Maximum resident set size (kbytes)")) / 1024, "wall_s": wall}


def runner_steady(show_json):
    """Steady tokens/s from the stage's timings.jsonl (step lines carry tokens and elapsed_s)."""
    show = json.load(open(show_json))
    path = os.path.join(show["path"], "timings.jsonl")
    steps = {}
    for line in open(path):
        row = json.loads(line)
        if "tokens" in row and "elapsed_s" in row:
            steps[row["step"]] = row
    n = max(steps)
    tokens = sum(steps[s]["tokens"] for s in range(SKIP + 1, n + 1))
    return tokens / (steps[n]["elapsed_s"] - steps[SKIP]["elapsed_s"])


rows = {}  # job -> list of {tps, rss_mib, wall_s}


def add(job, tps, timing):
    rows.setdefault(job, []).append({"tps": tps, **timing})


for rep in range(1, reps + 1):
    for stage, job in [("sft", "runner sft"), ("dpo_continued", "runner dpo1"),
                       ("merged", "runner merge"), ("dpo_fresh", "runner dpo2"),
                       ("generic_sft", "runner sft, generic ops")]:
        tag = f"runner_{stage}_rep{rep}"
        if not os.path.exists(f"{out}/logs/{tag}.time"):
            continue
        tps = None if stage == "merged" else runner_steady(f"{out}/logs/{tag}.show.json")
        add(job, tps, time_v(f"{out}/logs/{tag}.time"))
    for job, folder in [("sft", "sft"), ("sft_plain", "sft_plain"), ("dpo1", "dpo_scheme1"),
                        ("dpo2", "dpo_scheme2"), ("dpo_plain1", "dpo_plain_scheme1"),
                        ("dpo_plain2", "dpo_plain_scheme2")]:
        result = f"{peer}/runs/{folder}/result_rep{rep}.json"
        if os.path.exists(result):
            r = json.load(open(result))
            add(f"peer {job}", r["tokens_per_s_steady_real"],
                time_v(f"{peer}/runs/logs/{job}_rep{rep}.time"))


def med(job, key):
    values = [r[key] for r in rows.get(job, []) if r[key] is not None]
    return statistics.median(values) if values else float("nan")


print(f"\n{reps} interleaved repetition(s); medians (each repetition's values in brackets)\n")
print("| run | steady tokens/s | process wall s | peak RSS MiB |")
print("|---|---|---|---|")
for job, rs in rows.items():
    each = lambda key, fmt: ", ".join(fmt.format(r[key]) for r in rs if r[key] is not None)
    tps = f"{med(job, 'tps'):.0f} ({each('tps', '{:.0f}')})" if rs[0]["tps"] is not None else "-"
    print(f"| {job} | {tps} | {med(job, 'wall_s'):.1f} ({each('wall_s', '{:.1f}')}) "
          f"| {med(job, 'rss_mib'):.0f} |")

print("\nratios of medians (lora-runner / peer):")
for ours, theirs, key, what in [
    ("runner sft", "peer sft_plain", "tps", "SFT tokens/s vs the plain loop"),
    ("runner sft", "peer sft", "tps", "SFT tokens/s vs TRL"),
    ("runner dpo1", "peer dpo_plain1", "tps", "DPO scheme one tokens/s vs the plain loop"),
    ("runner dpo2", "peer dpo_plain2", "tps", "DPO scheme two tokens/s vs the plain loop"),
    ("runner dpo1", "peer dpo1", "wall_s", "DPO scheme one stage wall vs TRL's whole run (lower is better)"),
    ("runner dpo2", "peer dpo2", "wall_s", "DPO scheme two stage wall vs TRL's whole run (lower is better)"),
    ("runner sft", "peer sft_plain", "rss_mib", "SFT peak RSS vs the plain loop (lower is better)"),
    ("runner dpo1", "peer dpo_plain1", "rss_mib", "DPO scheme one peak RSS vs the plain loop (lower is better)"),
    ("runner sft, generic ops", "runner sft", "tps", "SFT tokens/s, generic ops vs fused"),
]:
    if ours in rows and theirs in rows:
        print(f"  {what}: {med(ours, key) / med(theirs, key):.2f}x")

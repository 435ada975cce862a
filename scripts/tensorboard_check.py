"""Reads runner's TensorBoard event files with TensorBoard's own reader and
checks them against each stage's metrics.jsonl.

    RECIPE_FILE=recipes/demo.toml RUNNER=target/release/runner \
        python scripts/tensorboard_check.py TB_DIR CACHE RECIPE_NAME

TB_DIR is what `runner run --tensorboard TB_DIR` wrote; CACHE the cache the
run used (metrics.jsonl and timings.jsonl are read from each stage's
artifact through `runner show --json`; RUNNER is the binary, `runner` on
PATH by default). Every scalar at every step must equal the metrics line (as f32),
nothing may be logged twice, and the hparams plugin must see the stage's
parameters. Needs `pip install tensorboard` (outside the repository).
Prints one JSON line per run; exits 1 on any mismatch.
"""

import json
import os
import struct
import sys

from tensorboard.backend.event_processing import event_accumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from artifact_values import artifact_values

tb_dir, cache, recipe = sys.argv[1:4]
failures = 0
for run in sorted(os.listdir(os.path.join(tb_dir, recipe))):
    path = os.path.join(tb_dir, recipe, run)
    acc = event_accumulator.EventAccumulator(path, size_guidance={event_accumulator.SCALARS: 0})
    acc.Reload()
    want = {k if k.startswith("eval/") else "train/" + k: steps
            for k, steps in artifact_values(cache, run).items()}
    tags = acc.Tags()["scalars"]
    checked = 0
    for tag, steps in want.items():
        if tag not in tags:
            print(f"{run}: no tag {tag}", file=sys.stderr)
            failures += 1
            continue
        events = acc.Scalars(tag)
        got = {}
        for e in events:
            if e.step in got:
                # A resumed run that logged a step twice.
                print(f"{run}: {tag} logged twice at step {e.step}", file=sys.stderr)
                failures += 1
            got[e.step] = e.value
        for step, v in steps.items():
            as_f32 = struct.unpack("f", struct.pack("f", v))[0]
            if step not in got or got[step] != as_f32:
                print(f"{run}: {tag} at step {step}: {got.get(step)} vs {v}", file=sys.stderr)
                failures += 1
            checked += 1
        extra = set(got) - set(steps)
        if extra:
            print(f"{run}: {tag} has steps not in metrics.jsonl: {sorted(extra)}", file=sys.stderr)
            failures += 1
    # The hparams plugin's session start info.
    content = acc.PluginTagToContent("hparams")
    info = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    hparams = {k: v.WhichOneof("kind") and getattr(v, v.WhichOneof("kind")) for k, v in info.hparams.items()}
    if "key" not in hparams or info.group_name != f"{recipe}/{run}":
        print(f"{run}: hparams {hparams} group {info.group_name}", file=sys.stderr)
        failures += 1
    print(json.dumps({"run": run, "tags": len(tags), "values": checked, "hparams": len(hparams),
                      "train.lr": hparams.get("train.lr")}))
sys.exit(1 if failures else 0)

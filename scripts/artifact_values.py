"""What a tracker should hold for one stage: the values of its artifact's
metrics.jsonl and timings.jsonl by TRL's name (`learning_rate` for `lr`) and
step. Shared by scripts/tensorboard_check.py and scripts/mlflow_check.py;
RUNNER (default `runner`) and RECIPE_FILE name the binary and the recipe.
"""

import json
import os
import subprocess


def artifact_values(cache, stage):
    """{name: {step: value}} of `stage`'s artifact in `cache`."""
    runner = os.environ.get("RUNNER", "runner")
    out = subprocess.run([runner, "--cache", cache, "show", os.environ["RECIPE_FILE"], stage, "--json"],
                         check=True, capture_output=True, text=True).stdout
    artifact = json.loads(out)["path"]
    values = {}
    # metrics.jsonl holds the values, timings.jsonl the wall-clock ones.
    for name in ["metrics.jsonl", "timings.jsonl"]:
        file = os.path.join(artifact, name)
        for line in open(file) if os.path.exists(file) else []:
            row = json.loads(line)
            step = row.pop("step")
            for k, v in row.items():
                if isinstance(v, (int, float)):
                    values.setdefault("learning_rate" if k == "lr" else k, {})[step] = v
    return values

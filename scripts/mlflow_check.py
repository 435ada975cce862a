"""Reads what `runner run --mlflow URI` logged, with MLflow's own client, and
checks it against each stage's metrics.jsonl and timings.jsonl.

    RECIPE_FILE=recipes/demo.toml RUNNER=target/release/runner \\
        python scripts/mlflow_check.py URI CACHE EXPERIMENT

Every metric at every step must equal the artifact's line, no step may be
logged twice, each run must be FINISHED with the stage's parameters. The
wall-clock figures (elapsed_s, tokens_per_s) of steps a killed process sent
before a resumed one recomputed them are the first process's: for those
only the steps are compared. Needs
`pip install mlflow` (outside the repository) and a server at URI
(`mlflow server --backend-store-uri sqlite:///db.sqlite --port 5077`).
Prints one JSON line per run; exits 1 on any mismatch.
"""

import json
import sys

from mlflow.tracking import MlflowClient

from artifact_values import artifact_values

uri, cache, experiment = sys.argv[1:4]
client = MlflowClient(tracking_uri=uri)
exp = client.get_experiment_by_name(experiment)
failures = 0
runs = client.search_runs([exp.experiment_id])
for run in sorted(runs, key=lambda r: r.info.run_name):
    stage = run.info.run_name.split("/", 1)[1]
    want = artifact_values(cache, stage)
    checked = 0
    for key, steps in want.items():
        history = client.get_metric_history(run.info.run_id, key)
        got = {}
        for m in history:
            if m.step in got:
                print(f"{stage}: {key} logged twice at step {m.step}", file=sys.stderr)
                failures += 1
            got[m.step] = m.value
        timing = key in ("elapsed_s", "tokens_per_s")
        if (set(got) != set(steps)) if timing else (got != steps):
            bad = [(s, got.get(s), v) for s, v in steps.items() if got.get(s) != v][:3]
            print(f"{stage}: {key}: {len(got)} logged vs {len(steps)}; first differences {bad}", file=sys.stderr)
            failures += 1
        checked += len(steps)
    if run.info.status != "FINISHED" or "train.lr" not in run.data.params or "key" not in run.data.params:
        print(f"{stage}: status {run.info.status}, params {sorted(run.data.params)[:5]}", file=sys.stderr)
        failures += 1
    print(json.dumps({"run": run.info.run_name, "status": run.info.status, "metrics": len(want),
                      "values": checked, "params": len(run.data.params)}))
sys.exit(1 if failures else 0)

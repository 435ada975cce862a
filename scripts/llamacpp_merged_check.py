"""A merged model exported by `runner export --gguf` in llama.cpp itself: the
completion loss of held-out rows under each exported GGUF, against this
program's own evaluation of the same model (an eval stage's examples.jsonl,
`sft/loss` per row). Run once in a venv outside the repository
(llama-cpp-python):

    python scripts/llamacpp_merged_check.py ROWS.jsonl EXAMPLES.jsonl NAME=GGUF... [--rows N]

ROWS.jsonl has prompt/completion rows; EXAMPLES.jsonl is the eval's per-row
output on those rows (its `line` field names the row).
"""

import json
import math
import sys

import llama_cpp
from llama_cpp import Llama


def completion_nll(llm, prompt, completion):
    """Mean loss of the completion's tokens after the prompt, the EOS token
    included (as `eval` scores a row by default: the tokens of prompt +
    completion past the prompt's, then the model's EOS)."""
    p = llm.tokenize(prompt.encode(), add_bos=False, special=True)
    ids = llm.tokenize((prompt + completion).encode(), add_bos=False, special=True)
    assert ids[: len(p)] == p, "the prompt's tokens are a prefix"
    ids.append(llm.token_eos())
    llm.reset()
    llm.eval(ids)
    total = 0.0
    for t in range(len(p), len(ids)):
        logits = [float(x) for x in llm.scores[t - 1]]
        top = max(logits)
        total -= logits[ids[t]] - (top + math.log(sum(math.exp(x - top) for x in logits)))
    return total / (len(ids) - len(p))


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--rows")]
    n = next((int(a.split("=")[1]) for a in sys.argv[1:] if a.startswith("--rows=")), 8)
    rows = [json.loads(l) for l in open(args[0]).read().splitlines()][:n]
    ours = {e["line"]: e["sft/loss"] for e in map(json.loads, open(args[1]).read().splitlines()) if e.get("data") == "sft"}
    models = [a.split("=", 1) for a in args[2:]]
    out = {"llama_cpp_python": llama_cpp.__version__, "rows": []}
    llms = {name: Llama(model_path=path, n_ctx=256, logits_all=True, verbose=False, n_threads=2) for name, path in models}
    for line, row in enumerate(rows, start=1):
        entry = {"text": row["prompt"] + row["completion"], "runner_eval": ours[line]}
        for name, llm in llms.items():
            entry[name] = completion_nll(llm, row["prompt"], row["completion"])
        out["rows"].append(entry)
    for name in llms:
        rel = [abs(r[name] - r["runner_eval"]) / r["runner_eval"] for r in out["rows"]]
        out[f"{name}_max_rel_diff"] = max(rel)
        out[f"{name}_mean_loss"] = sum(r[name] for r in out["rows"]) / len(out["rows"])
    out["runner_eval_mean_loss"] = sum(r["runner_eval"] for r in out["rows"]) / len(out["rows"])
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

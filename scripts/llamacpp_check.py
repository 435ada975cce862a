"""llama.cpp itself (llama-cpp-python) on SmolLM2's GGUF: its token ids for
the texts of tests/fixtures/smollm2.json and its next-token loss on them,
written to tests/fixtures/smollm2-llamacpp.json, which tests/model/gguf.rs
compares with lora-runner's tokenizer and model. Run once in a venv outside
the repository (`pip install llama-cpp-python` builds llama.cpp):

    python scripts/llamacpp_check.py models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \
        > tests/fixtures/smollm2-llamacpp.json
"""

import json
import math
import sys
from pathlib import Path

import llama_cpp
from llama_cpp import Llama


def llama_nll(llm, ids):
    """Mean next-token loss of `ids` under llama.cpp's logits."""
    llm.reset()
    llm.eval(ids)
    total = 0.0
    for t in range(len(ids) - 1):
        logits = [float(x) for x in llm.scores[t]]
        top = max(logits)
        total -= logits[ids[t + 1]] - (top + math.log(sum(math.exp(x - top) for x in logits)))
    return total / (len(ids) - 1)


def main():
    gguf = sys.argv[1]
    fixture = json.loads((Path(__file__).parent.parent / "tests/fixtures/smollm2.json").read_text())
    llm = Llama(model_path=gguf, n_ctx=256, logits_all=True, verbose=False, n_threads=2)
    texts = []
    for item in fixture["texts"] + [{"text": c["prompt"]} for c in fixture["chats"]]:
        ids = llm.tokenize(item["text"].encode(), add_bos=False, special=True)
        row = {"text": item["text"], "ids": ids}
        if "nll" in item:
            row["nll"] = llama_nll(llm, ids)
        texts.append(row)
    print(json.dumps({"llama_cpp_python": llama_cpp.__version__, "texts": texts}, indent=1))


if __name__ == "__main__":
    main()

"""An adapter exported by `runner export --gguf` in llama.cpp itself, against
the same adapter in PEFT on transformers' model: both on the base GGUF, the
next-token loss of a few rows with and without the adapter. Run once in a
venv outside the repository (llama-cpp-python, transformers 5.24, PEFT 0.21,
gguf):

    python scripts/llamacpp_adapter_check.py BASE.gguf EXPORT_DIR ROWS.jsonl [N]

EXPORT_DIR holds adapter.gguf and the PEFT files (adapter_config.json,
adapter_model.safetensors); ROWS.jsonl has prompt/completion rows.
"""

import json
import sys
from pathlib import Path

import llama_cpp
import torch
from llama_cpp import Llama
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from llamacpp_check import llama_nll


def torch_nll(model, ids):
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    logp = torch.log_softmax(logits, -1)[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    return -logp.mean().item()


def main():
    base, export, rows = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    n = int(sys.argv[4]) if len(sys.argv) > 4 else 8
    texts = [r["prompt"] + r["completion"] for r in map(json.loads, rows.read_text().splitlines()[:n])]
    plain = Llama(model_path=str(base), n_ctx=256, logits_all=True, verbose=False, n_threads=2)
    adapted = Llama(model_path=str(base), lora_path=str(export / "adapter.gguf"), n_ctx=256,
                    logits_all=True, verbose=False, n_threads=2)
    tok = AutoTokenizer.from_pretrained(base.parent, gguf_file=base.name)
    model = AutoModelForCausalLM.from_pretrained(base.parent, gguf_file=base.name, dtype=torch.float32).eval()
    hf_base = [torch_nll(model, tok(t).input_ids) for t in texts]
    peft = PeftModel.from_pretrained(model, export).eval()
    out = []
    for text, b in zip(texts, hf_base):
        ids = plain.tokenize(text.encode(), add_bos=False, special=True)
        out.append({"text": text, "llama_cpp": llama_nll(plain, ids), "llama_cpp_lora": llama_nll(adapted, ids),
                    "transformers": b, "peft": torch_nll(peft, tok(text).input_ids)})
    print(json.dumps({"llama_cpp_python": llama_cpp.__version__, "rows": out}, indent=1))


if __name__ == "__main__":
    main()

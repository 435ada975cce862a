"""Token ids of a few hundred strings under SmolLM2's GGUF tokenizer as
llama.cpp builds it (llama-cpp-python, vocab only), for the test that this
program's tokenizer from the same GGUF gives the same ids
(tests/model/gguf.rs). Strings: English prose (README.md's sentences), the
SmolLM2 recipe's rows, numbers of every length, runs of spaces, tabs and
newlines, accents, other scripts and emoji, and chat-template text. Run once
in a venv outside the repository (llama-cpp-python), after
scripts/fetch-smollm2.sh:

    python scripts/smollm2_tokenizer_check.py models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \
        > tests/fixtures/smollm2-tokenizer.json
"""

import json
import random
import re
import sys
from pathlib import Path

import llama_cpp

ROOT = Path(__file__).resolve().parent.parent


def strings():
    rng = random.Random(7)
    out = []
    prose = re.split(r"(?<=[.!?])\s+", (ROOT / "README.md").read_text())
    out += [p.strip() for p in prose if 20 < len(p.strip()) < 300][:120]
    for name in ["sft_eval.jsonl", "dpo_eval.jsonl", "general.jsonl"]:
        for line in (ROOT / "recipes/data/smollm2" / name).read_text().splitlines()[:25]:
            row = json.loads(line)
            out.append(row["prompt"] + row.get("completion", row.get("chosen", "")))
    for n in range(1, 13):
        out.append(str(rng.randrange(10 ** (n - 1), 10 ** n)))
        out.append(f"{rng.random() * 10 ** n:.3f} and -{rng.randrange(10 ** n)}")
    for _ in range(30):
        ws = "".join(rng.choice([" ", "  ", "\t", "\n", "\n\n", "\r\n", "   "]) for _ in range(rng.randrange(1, 5)))
        out.append(f"word{ws}next{ws}")
        out.append(f"{ws}lead")
    out += ["naïve café résumé", "Größe Übung straße", "日本語のテキスト", "中文文本测试", "Привет, мир!",
            "مرحبا بالعالم", "🦙🚀✅ emoji 👍🏽", "don't I'll we've they're SHE'D", "x**2 + y_1 == z[3]; // ok",
            "<|im_start|>user\nHi<|im_end|>\n", "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
            "", " ", "\n", "a", "<|endoftext|>"]
    return out


def main():
    llm = llama_cpp.Llama(model_path=sys.argv[1], vocab_only=True, verbose=False)
    rows = [{"text": t, "ids": llm.tokenize(t.encode(), add_bos=False, special=True)} for t in strings()]
    print(json.dumps({"llama_cpp_python": llama_cpp.__version__, "rows": rows}, ensure_ascii=False))


if __name__ == "__main__":
    main()

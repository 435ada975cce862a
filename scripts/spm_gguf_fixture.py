"""A SentencePiece ("llama") tokenizer in a GGUF, and the ids llama.cpp and
transformers give for it: tests/fixtures/spm/model.gguf (a tiny random
llama model carrying a SentencePiece BPE vocabulary trained here, with byte
fallback, split digits and two user-defined tokens, laid out as llama.cpp's
converter writes one) and tests/fixtures/spm/ids.json. Run once in a venv
outside the repository (sentencepiece, gguf, numpy, llama-cpp-python,
transformers 5.24):

    python scripts/spm_gguf_fixture.py tests/fixtures/spm
"""

import json
import random
import sys
from pathlib import Path

import gguf
import numpy as np
import sentencepiece as spm

CORPUS = """The quick brown fox jumps over the lazy dog. A model learns from data;
a tokenizer cuts text into pieces. Fine-tuning with LoRA trains two small matrices
beside each frozen weight, and DPO teaches a preference between two answers.
In 2026, 12345 people paid $3.50 each; 7 of them came back on 2026-12-06 at 10:45.
Il était une fois une petite ville au bord de la mer. Ça va très bien, merci!
Der schnelle braune Fuchs springt über den faulen Hund. Größe, Straße, Übung.
def main():\n    print("hello, world")\n    return 0\n
<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\nParis.<|im_end|>
"""

TEXTS = [
    "Hello world",
    " leading space and  two   three    four",
    "The quick brown fox jumps over the lazy dog.",
    "In 2026, 12345 people paid $3.50 each.",
    "line one\nline two\n\n\tindented\r\nend",
    "naïve café Größe — “quotes” ‘single’",
    "日本語のテキスト 🦙🚀 emoji",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "unseenwordsxyzzy qwertyuiop",
    "",
    " ",
    "trailing spaces   ",
]


def main():
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    work = Path("/tmp/spm-fixture")
    work.mkdir(exist_ok=True)
    random.seed(0)
    lines = CORPUS.splitlines() * 20
    random.shuffle(lines)
    (work / "corpus.txt").write_text("\n".join(lines))
    spm.SentencePieceTrainer.train(
        input=str(work / "corpus.txt"), model_prefix=str(work / "sp"), model_type="bpe",
        vocab_size=600, byte_fallback=True, split_digits=True, character_coverage=1.0,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True, add_dummy_prefix=True,
        user_defined_symbols=["<|im_start|>", "<|im_end|>"], unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
    )
    sp = spm.SentencePieceProcessor(model_file=str(work / "sp.model"))
    tokens, scores, types = [], [], []
    for i in range(sp.get_piece_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(sp.get_score(i))
        if sp.is_unknown(i):
            types.append(gguf.TokenType.UNKNOWN)
        elif sp.is_control(i):
            types.append(gguf.TokenType.CONTROL)
        elif sp.is_unused(i):
            types.append(gguf.TokenType.UNUSED)
        elif sp.is_byte(i):
            types.append(gguf.TokenType.BYTE)
        elif tokens[-1] in ("<|im_start|>", "<|im_end|>"):
            types.append(gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)

    hidden, ffn, heads = 32, 64, 4
    w = gguf.GGUFWriter(str(out / "model.gguf"), "llama")
    w.add_context_length(128)
    w.add_embedding_length(hidden)
    w.add_block_count(1)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(heads)
    w.add_rope_dimension_count(hidden // heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    rng = np.random.default_rng(0)
    t = lambda *shape: (rng.standard_normal(shape) * 0.1).astype(np.float16)
    w.add_tensor("token_embd.weight", t(len(tokens), hidden))
    w.add_tensor("output_norm.weight", np.ones(hidden, dtype=np.float32))
    for name, shape in [("attn_q", (hidden, hidden)), ("attn_k", (hidden, hidden)), ("attn_v", (hidden, hidden)),
                        ("attn_output", (hidden, hidden)), ("ffn_gate", (ffn, hidden)), ("ffn_up", (ffn, hidden)),
                        ("ffn_down", (hidden, ffn))]:
        w.add_tensor(f"blk.0.{name}.weight", t(*shape))
    for name in ("attn_norm", "ffn_norm"):
        w.add_tensor(f"blk.0.{name}.weight", np.ones(hidden, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    import llama_cpp
    from transformers import AutoTokenizer
    llm = llama_cpp.Llama(model_path=str(out / "model.gguf"), vocab_only=True, verbose=False)
    tok = AutoTokenizer.from_pretrained(str(out), gguf_file="model.gguf")
    rows = []
    for text in TEXTS:
        rows.append({
            "text": text,
            "llama_cpp": llm.tokenize(text.encode(), add_bos=True, special=True),
            "transformers": tok(text).input_ids,
            "sentencepiece": [1] + sp.encode(text),
        })
    (out / "ids.json").write_text(json.dumps({
        "llama_cpp_python": llama_cpp.__version__,
        "transformers": __import__("transformers").__version__,
        "sentencepiece": spm.__version__,
        "rows": rows,
    }, indent=1, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()

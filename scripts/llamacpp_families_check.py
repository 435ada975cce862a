"""Model GGUFs of Gemma 2, Gemma 3, Phi-3, OLMo 2 and Llama 3 (its rope as
`rope_freqs`, q/k rows permuted) written by `runner
export --gguf`, run by llama.cpp itself, against transformers on the folders
they were written from. Each family gets a small random checkpoint made here
by transformers with what llama.cpp hardcodes stated the way llama.cpp
computes it (Gemma's query_pre_attn_scalar = head_dim, its default sliding
pattern; windows of 3 and Gemma 3's linear rope scaling on global layers so
they matter at these lengths; Phi-3 LongRoPE short factors, as both pick them
below the original context), weights at std 0.2 so attention is peaked. Run
once in a venv outside the repository (transformers 5.24, tokenizers,
llama-cpp-python):

    python scripts/llamacpp_families_check.py target/release/runner /tmp/families-check

and it prints the largest logit difference per family (JSON).
"""

import json
import subprocess
import sys
from pathlib import Path

import llama_cpp
import numpy as np
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers, decoders

VOCAB = 260
IDS = [[5, 77, 190, 3, 42, 42, 9, 250, 17, 88, 131, 6], [200, 1, 64, 64, 64, 12, 99]]


def configs():
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.2,
                  rms_norm_eps=1e-6)
    return {
        "gemma2": transformers.Gemma2Config(**common, num_hidden_layers=4, head_dim=16, query_pre_attn_scalar=16,
                                            sliding_window=3, attn_logit_softcapping=50.0,
                                            final_logit_softcapping=30.0),
        "gemma3": transformers.Gemma3TextConfig(
            **common, num_hidden_layers=6, head_dim=16, query_pre_attn_scalar=16, sliding_window=3,
            rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                             "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000000.0}}),
        "phi3": transformers.Phi3Config(
            **{**common, "max_position_embeddings": 128}, num_hidden_layers=2, pad_token_id=0,
            rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 1.0,
                             "original_max_position_embeddings": 64,
                             "short_factor": [1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6, 1.7],
                             "long_factor": [2.0] * 8}),
        "olmo2": transformers.Olmo2Config(**common, num_hidden_layers=2, pad_token_id=0),
        "llama3": transformers.LlamaConfig(
            **common, num_hidden_layers=2, head_dim=16,
            rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
    }


def byte_tokenizer(path):
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {c: i for i, c in enumerate(sorted(alphabet))}
    for extra in ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"]:
        vocab[extra] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))


def main():
    runner, work = Path(sys.argv[1]).resolve(), Path(sys.argv[2])
    work.mkdir(parents=True, exist_ok=True)
    out = {"llama_cpp_python": llama_cpp.__version__, "transformers": transformers.__version__, "families": {}}
    for name, config in configs().items():
        torch.manual_seed(0)
        folder = work / name
        model = transformers.AutoModelForCausalLM.from_config(config).eval()
        model.save_pretrained(folder)
        byte_tokenizer(folder)
        recipe = work / f"{name}.toml"
        recipe.write_text(f'[recipe]\nname = "{name}"\n\n[stages.base]\nkind = "base"\npath = "{folder}"\n')
        cache = work / "cache"
        subprocess.run([runner, "--cache", cache, "run", recipe], check=True)
        subprocess.run([runner, "--cache", cache, "export", recipe, "base", work / f"{name}-out",
                        "--gguf", "--gguf-type", "f32"], check=True)
        llm = llama_cpp.Llama(model_path=str(work / f"{name}-out" / "model.gguf"), n_ctx=64,
                              logits_all=True, verbose=False, n_threads=2)
        worst, scale = 0.0, 0.0
        for ids in IDS:
            with torch.no_grad():
                want = model(torch.tensor([ids])).logits[0].double().numpy()
            llm.reset()
            llm.eval(ids)
            got = np.array([llm.scores[t] for t in range(len(ids))], dtype=np.float64)
            worst = max(worst, float(np.abs(got - want).max()))
            scale = max(scale, float(np.abs(want).max()))
        out["families"][name] = {"max_abs_logit_diff": worst, "max_abs_logit": scale}
        print(name, worst, scale, file=sys.stderr)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

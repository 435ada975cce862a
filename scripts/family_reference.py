"""Tiny random checkpoints of every supported family, with transformers' own
logits, log-probs and PEFT LoRA gradients on them.

Writes tests/fixtures/families/<name>/ (config.json and model.safetensors as
transformers 5 saves them, adapter_config.json + adapter_model.safetensors
as PEFT saves them, reference.safetensors and reference.json with the
expected values) and tests/fixtures/rope-init.json (inverse frequencies and
attention factors from transformers' ROPE_INIT_FUNCTIONS). The Rust tests in
tests/model/families.rs compare lora-runner with them. Run it in a venv
outside the repository with transformers 5.24 and PEFT 0.21 (see
../shared/peer-bench/README.md):

    python scripts/family_reference.py tests/fixtures

Each checkpoint is configured so that every feature of its family changes
the numbers: norms and biases moved away from their init, sliding windows
shorter than the test rows, Gemma's query_pre_attn_scalar != head_dim and
soft-caps that saturate, rope scaling active at the test lengths, q/k norms,
NoPE layers. The model runs in float64 with eager attention.
"""

import json
import math
import sys
from pathlib import Path

import peft
import torch
import transformers
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

VOCAB = 128
HIDDEN, LAYERS, HEADS, KV_HEADS, FFN = 32, 2, 4, 2, 64
ROWS = [11, 7]  # token counts of the two test rows (longer than every window)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=HIDDEN,
    intermediate_size=FFN,
    num_hidden_layers=LAYERS,
    num_attention_heads=HEADS,
    num_key_value_heads=KV_HEADS,
    max_position_embeddings=64,
    rms_norm_eps=1e-5,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    attn_implementation="eager",
)

FAMILIES = {
    # Llama 3: llama3 rope scaling active at these lengths (original context 16).
    "llama3": (transformers.LlamaConfig, dict(
        head_dim=16, tie_word_embeddings=False, attention_bias=True,
        rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0,
                             low_freq_factor=1.0, high_freq_factor=4.0,
                             original_max_position_embeddings=16))),
    # Llama with YaRN (attention factor on cos/sin).
    "llama-yarn": (transformers.LlamaConfig, dict(
        tie_word_embeddings=True,
        rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0,
                             original_max_position_embeddings=16))),
    "mistral": (transformers.MistralConfig, dict(sliding_window=4, tie_word_embeddings=False)),
    # Qwen2 with a window on layer 1 only (max_window_layers = 1).
    "qwen2": (transformers.Qwen2Config, dict(
        use_sliding_window=True, sliding_window=3, max_window_layers=1, tie_word_embeddings=True,
        rope_parameters=dict(rope_type="default", rope_theta=1000000.0))),
    "qwen3": (transformers.Qwen3Config, dict(head_dim=16, tie_word_embeddings=True)),
    "gemma2": (transformers.Gemma2Config, dict(
        head_dim=16, query_pre_attn_scalar=24, sliding_window=3,
        attn_logit_softcapping=1.0, final_logit_softcapping=3.0, hidden_activation="gelu_pytorch_tanh")),
    # Gemma 3: local/global layers with their own rope bases; linear scaling on the global one.
    "gemma3": (transformers.Gemma3TextConfig, dict(
        head_dim=16, query_pre_attn_scalar=24, sliding_window=3,
        layer_types=["sliding_attention", "full_attention"],
        rope_parameters={"full_attention": dict(rope_type="linear", factor=2.0, rope_theta=1000000.0),
                         "sliding_attention": dict(rope_type="default", rope_theta=10000.0)})),
    "olmo2": (transformers.Olmo2Config, dict(tie_word_embeddings=False)),
    # SmolLM3: layer 1 without rope.
    "smollm3": (transformers.SmolLM3Config, dict(no_rope_layers=[1, 0], tie_word_embeddings=True)),
    # Phi-3: fused qkv_proj and gate_up_proj; LongRoPE with both rows past the
    # original context (long factors), a window of 5.
    "phi3": (transformers.Phi3Config, dict(
        sliding_window=5, tie_word_embeddings=False, original_max_position_embeddings=4,
        rope_parameters=dict(rope_type="longrope", rope_theta=10000.0,
                             short_factor=[1.0 + 0.05 * i for i in range(4)],
                             long_factor=[1.5 + 0.5 * i for i in range(4)]))),
}
FUSED_TARGETS = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]


def perturb(model, gen):
    """Weights large enough that attention and the head are far from
    uniform, and norms/biases away from their init."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
            elif "embed_tokens" in name or "lm_head" in name:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def row_outputs(model, ids):
    """Logits [t, vocab] and next-token log-probs [t - 1] of one row alone."""
    out = model(input_ids=torch.tensor([ids])).logits[0]
    logp = torch.log_softmax(out, dim=-1)
    targets = torch.tensor(ids[1:])
    return out, logp[:-1].gather(1, targets[:, None])[:, 0]


def family(name, config_class, extra, root, seed):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    config = config_class(**COMMON, **extra)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").to(torch.float32)
    perturb(model, gen)
    folder = root / "families" / name
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    rows = [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in ROWS]

    tensors, summary = {}, {"rows": rows, "family": name}
    reference = model.to(torch.float64).eval()
    with torch.no_grad():
        for i, ids in enumerate(rows):
            logits, logp = row_outputs(reference, ids)
            tensors[f"logits.{i}"] = logits.contiguous()
            tensors[f"logprobs.{i}"] = logp.contiguous()

    # PEFT LoRA with both matrices random (B = 0 would give A no gradient),
    # saved in f32, then its loss and gradients in f64.
    model = model.to(torch.float32)
    targets = FUSED_TARGETS if name == "phi3" else TARGETS
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0,
                      init_lora_weights=False)
    torch.manual_seed(seed + 1)
    peft_model = get_peft_model(model, lora)
    peft_model.save_pretrained(folder)
    peft_model = peft_model.to(torch.float64)
    peft_model.train()
    total, count = 0.0, 0
    for ids in rows:
        _, logp = row_outputs(peft_model, ids)
        total = total - logp.sum()
        count += len(ids) - 1
    loss = total / count
    loss.backward()
    summary["lora_loss"] = loss.item()
    for pname, p in peft_model.named_parameters():
        if p.requires_grad:
            key = pname.replace(".default", "")
            tensors[f"grad.{key}"] = p.grad.detach().contiguous()
    with torch.no_grad():
        adapted = [row_outputs(peft_model, ids)[1].sum().item() for ids in rows]
    summary["lora_row_logprobs"] = adapted
    save_file(tensors, str(folder / "reference.safetensors"))
    (folder / "README.md").unlink(missing_ok=True)  # PEFT's model card
    (folder / "reference.json").write_text(json.dumps(summary, indent=1) + "\n")


def rope_cases():
    """Inverse frequencies and attention factors of each rope type, from
    transformers' own init functions (with seq_len where it matters)."""
    cases = []
    base = dict(hidden_size=64, num_attention_heads=4, head_dim=16, max_position_embeddings=64)
    specs = [
        ("default", dict(rope_type="default", rope_theta=10000.0), None),
        ("linear", dict(rope_type="linear", rope_theta=10000.0, factor=4.0), None),
        ("dynamic-short", dict(rope_type="dynamic", rope_theta=10000.0, factor=2.0), 32),
        ("dynamic-long", dict(rope_type="dynamic", rope_theta=10000.0, factor=2.0), 200),
        ("llama3", dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                        high_freq_factor=4.0, original_max_position_embeddings=16), None),
        ("yarn", dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=16), None),
        ("yarn-betas", dict(rope_type="yarn", rope_theta=1000000.0, factor=8.0, beta_fast=16.0, beta_slow=2.0,
                            original_max_position_embeddings=32, truncate=False), None),
        ("yarn-mscale", dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, mscale=1.0, mscale_all_dim=0.5,
                             original_max_position_embeddings=16), None),
        ("longrope-short", dict(rope_type="longrope", rope_theta=10000.0,
                                short_factor=[1.0 + 0.1 * i for i in range(8)],
                                long_factor=[2.0 + 0.5 * i for i in range(8)],
                                original_max_position_embeddings=16), 10),
        ("longrope-long", dict(rope_type="longrope", rope_theta=10000.0,
                               short_factor=[1.0 + 0.1 * i for i in range(8)],
                               long_factor=[2.0 + 0.5 * i for i in range(8)],
                               original_max_position_embeddings=16), 40),
    ]
    for name, params, seq_len in specs:
        config = transformers.LlamaConfig(**base, rope_parameters=dict(params))
        kind = config.rope_parameters["rope_type"]
        if kind == "default":
            inv, factor = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding.compute_default_rope_parameters(config)
        else:
            inv, factor = ROPE_INIT_FUNCTIONS[kind](config, None, seq_len=seq_len)
        cases.append(dict(name=name, rope_parameters=params, max_position_embeddings=64, head_dim=16,
                          seq_len=seq_len or 0, inv_freq=inv.double().tolist(), attention_factor=float(factor)))
    return cases


def main():
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures")
    for seed, (name, (config_class, extra)) in enumerate(FAMILIES.items()):
        family(name, config_class, extra, root, 1000 + seed)
    versions = {"transformers": transformers.__version__, "peft": peft.__version__, "torch": torch.__version__}
    out = {"versions": versions, "cases": rope_cases()}
    (root / "rope-init.json").write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(versions))


if __name__ == "__main__":
    main()

"""PEFT's DoRA on three of the tiny family checkpoints: its loss, gradients
and merged logits, and PEFT's loss with the DoRA adapters lora-runner trained.

For llama3 (plain), qwen2 (q/k/v biases) and phi3 (fused qkv_proj and
gate_up_proj) under tests/fixtures/families/<name>/, writes
tests/fixtures/dora/<name>/:
- adapter_config.json + adapter_model.safetensors as PEFT 0.21 saves a DoRA
  adapter (`use_dora = true`, `lora_magnitude_vector` per module), with A, B
  and the magnitude all moved away from their init so that each matters;
- reference.safetensors: the gradients of the mean next-token loss over
  reference.json's rows with respect to every adapter tensor (float64,
  training mode, no dropout), and the logits of each row after PEFT's
  merge_and_unload (the merged weight is m / ||W + sBA|| * (W + sBA));
- reference.json: the rows, the loss, and, when tests/fixtures/dora/<name>/
  trained/ exists (an adapter lora-runner trained with `dora = true` and
  exported), the loss PEFT computes with that adapter.

tests/model/dora.rs compares lora-runner with them. Run it in a venv outside
the repository with transformers 5.24 and PEFT 0.21 (../shared/peer-bench):

    python scripts/dora_reference.py tests/fixtures
"""

import json
import shutil
import sys
import tempfile
from pathlib import Path

import peft
import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

FAMILIES = {
    "llama3": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
}


def load_base(folder, dtype):
    # The family folder also holds a plain LoRA adapter that from_pretrained
    # would apply: load the checkpoint alone.
    with tempfile.TemporaryDirectory() as alone:
        for name in ("config.json", "model.safetensors"):
            shutil.copy(folder / name, alone)
        return AutoModelForCausalLM.from_pretrained(alone, attn_implementation="eager", dtype=dtype)


def mean_nll(model, rows):
    total, count = 0.0, 0
    for ids in rows:
        logits = model(input_ids=torch.tensor([ids])).logits[0]
        logp = torch.log_softmax(logits.double(), dim=-1)[:-1]
        total = total - logp.gather(1, torch.tensor(ids[1:])[:, None]).sum()
        count += len(ids) - 1
    return total / count


def family(name, targets, root, seed):
    source = root / "families" / name
    rows = json.loads((source / "reference.json").read_text())["rows"]
    out = root / "dora" / name
    out.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(seed)
    model = load_base(source, torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0,
                        init_lora_weights=False, use_dora=True)
    peft_model = get_peft_model(model, config)
    # PEFT starts the magnitude at ||W + sBA||, where DoRA is plain LoRA:
    # move it so that a wrong norm or a lost magnitude shows.
    gen = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        for pname, p in peft_model.named_parameters():
            if "lora_magnitude_vector" in pname:
                p.mul_(1.0 + 0.3 * torch.randn(p.shape, generator=gen))
    peft_model.save_pretrained(out)
    (out / "README.md").unlink(missing_ok=True)  # PEFT's model card

    peft_model = peft_model.to(torch.float64)
    peft_model.train()
    loss = mean_nll(peft_model, rows)
    loss.backward()
    tensors = {}
    for pname, p in peft_model.named_parameters():
        if p.requires_grad:
            tensors["grad." + pname.replace(".default", "")] = p.grad.detach().contiguous()
    summary = {"family": name, "rows": rows, "loss": loss.item()}

    merged = peft_model.merge_and_unload().eval()
    with torch.no_grad():
        for i, ids in enumerate(rows):
            tensors[f"merged_logits.{i}"] = merged(input_ids=torch.tensor([ids])).logits[0].contiguous()
    save_file(tensors, str(out / "reference.safetensors"))

    trained = out / "trained"
    if trained.exists():
        base = load_base(source, torch.float64).eval()
        with torch.no_grad():
            summary["trained_base_loss"] = mean_nll(base, rows).item()
            adapted = PeftModel.from_pretrained(base, trained).eval()
            summary["trained_loss"] = mean_nll(adapted, rows).item()
    (out / "reference.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def main():
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures")
    results = [family(name, targets, root, 3000 + i) for i, (name, targets) in enumerate(FAMILIES.items())]
    versions = {"transformers": transformers.__version__, "peft": peft.__version__, "torch": torch.__version__}
    (root / "dora" / "versions.json").write_text(json.dumps(versions, indent=1) + "\n")
    print(json.dumps({"versions": versions, "losses": {r["family"]: r["loss"] for r in results}}))


if __name__ == "__main__":
    main()

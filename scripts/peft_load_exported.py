"""PEFT loads the adapters lora-runner exported for each family's checkpoint
and scores the fixture rows with them.

For every family under tests/fixtures/families/<name>/, loads transformers'
checkpoint (config.json, model.safetensors) in float64 with eager attention,
applies the adapter lora-runner trained and exported for it
(tests/fixtures/families/<name>/trained/, from `runner export` of an `sft`
stage), and writes the mean next-token loss over reference.json's rows, with
and without the adapter, to tests/fixtures/peft-exported.json.
tests/model/families.rs computes the same loss with lora-runner. Run it in a
venv outside the repository with transformers 5.24 and PEFT 0.21:

    python scripts/peft_load_exported.py tests/fixtures
"""

import json
import shutil
import sys
import tempfile
from pathlib import Path

import peft
import torch
import transformers
from peft import PeftModel
from transformers import AutoModelForCausalLM


def mean_nll(model, rows):
    total, count = 0.0, 0
    with torch.no_grad():
        for ids in rows:
            logits = model(input_ids=torch.tensor([ids])).logits[0]
            logp = torch.log_softmax(logits.double(), dim=-1)[:-1]
            total -= logp.gather(1, torch.tensor(ids[1:])[:, None]).sum().item()
            count += len(ids) - 1
    return total / count


def main():
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures")
    out = {"versions": {"transformers": transformers.__version__, "peft": peft.__version__,
                        "torch": torch.__version__}, "families": {}}
    for folder in sorted((root / "families").iterdir()):
        rows = json.loads((folder / "reference.json").read_text())["rows"]
        # The fixture folder also holds family_reference.py's PEFT adapter,
        # which from_pretrained would apply: load the checkpoint alone.
        with tempfile.TemporaryDirectory() as alone:
            for name in ("config.json", "model.safetensors"):
                shutil.copy(folder / name, alone)
            model = AutoModelForCausalLM.from_pretrained(alone, attn_implementation="eager",
                                                         dtype=torch.float64).eval()
        base = mean_nll(model, rows)
        adapted = PeftModel.from_pretrained(model, folder / "trained").eval()
        out["families"][folder.name] = {"base_loss": base, "adapter_loss": mean_nll(adapted, rows)}
    (root / "peft-exported.json").write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

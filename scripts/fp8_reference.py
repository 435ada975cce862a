"""A tiny FP8 checkpoint in transformers' fine-grained layout, its logits by
dequantising in torch, and torch's own float8_e4m3fn codes of edge values.

Writes tests/fixtures/fp8/:
- llama3/: tests/fixtures/families/llama3 with its seven projections per
  layer quantized as transformers 5.24's Fp8Quantize does
  (integrations/finegrained_fp8.py): per block of 16 x 16, scale =
  448 / max|w| (1 for an all-zero block), codes = clamp(w * scale, ±448)
  cast to float8_e4m3fn, weight_scale_inv = 1 / scale in f32; embeddings,
  norms and the head stay as stored. config.json carries
  quantization_config = {quant_method: "fp8", fmt: "e4m3",
  weight_block_size: [16, 16], activation_scheme: "dynamic"}.
- reference.safetensors: the logits of reference.json's rows from the
  model whose projections are the dequantised codes (codes * scale_inv,
  float64, eager attention), and `dequantised.<name>` of one projection.
- written.json, when tests/fixtures/fp8/written/ (an FP8 checkpoint this
  program wrote: a merge with `quantize = "fp8"` onto llama3/, 128 x 128
  blocks, so partial ones) and trained/ (a LoRA adapter it trained on
  llama3/'s FP8 codes) exist: transformers' logits of written/ as it loads
  FP8 on a CPU (dequantised), and PEFT's loss with trained/ on llama3/
  loaded by transformers and on the dense original families/llama3.
- codes.json: f32 values (zeros, every subnormal, ties, the largest
  normals, ±448 and beyond, NaN, random values) and torch's float8_e4m3fn
  byte for each after clamping to ±448, and without clamping.
- llama3-e5m2/: the same checkpoint with float8_e5m2 codes (fmt "e5m2"),
  blocks of 24 x 16 (partial along the rows), scale = 57344 / max|w|;
  e5m2.safetensors: its logits from the dequantised weights (f64) and one
  dequantised projection; e5m2.json: torch's value of each of the 256
  float8_e5m2 bytes, and what transformers makes of the checkpoint (its
  FP8Linear holds float8_e4m3fn, so it cannot read e5m2 codes as they are).

tests/model/fp8.rs compares lora-runner with them. Run it in a venv outside
the repository with torch 2.15 and transformers 5.24 (../shared/peer-bench):

    python scripts/fp8_reference.py tests/fixtures
"""

import json
import shutil
import sys
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from peft_load_exported import mean_nll  # beside this script

BLOCK = [16, 16]
FP8_MAX = 448.0
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def quantize(w):
    rows, cols = w.shape
    bm, bn = BLOCK
    blocks = w.to(torch.float32).reshape(rows // bm, bm, cols // bn, bn)
    max_abs = blocks.abs().amax(dim=(-3, -1))
    safe = torch.where(max_abs > 0, max_abs, torch.ones_like(max_abs))
    scales = torch.where(max_abs > 0, FP8_MAX / safe, torch.ones_like(safe))
    inv = (1.0 / scales).to(torch.float32)
    scaled = blocks * scales.unsqueeze(-1).unsqueeze(-3)
    codes = torch.clamp(scaled, min=-FP8_MAX, max=FP8_MAX).to(torch.float8_e4m3fn).reshape(rows, cols)
    return codes, inv


def quantize_blocks(w, block, fp8_max, dtype):
    """Any block size (the last blocks may be partial): zero-padded to whole
    blocks, which changes no block's maximum, then cropped."""
    rows, cols = w.shape
    bm, bn = block
    grid = (-(-rows // bm), -(-cols // bn))
    padded = torch.zeros(grid[0] * bm, grid[1] * bn, dtype=torch.float32)
    padded[:rows, :cols] = w.to(torch.float32)
    blocks = padded.reshape(grid[0], bm, grid[1], bn)
    max_abs = blocks.abs().amax(dim=(-3, -1))
    safe = torch.where(max_abs > 0, max_abs, torch.ones_like(max_abs))
    scales = torch.where(max_abs > 0, fp8_max / safe, torch.ones_like(safe))
    inv = (1.0 / scales).to(torch.float32)
    scaled = blocks * scales.unsqueeze(-1).unsqueeze(-3)
    codes = torch.clamp(scaled, min=-fp8_max, max=fp8_max).to(dtype)
    return codes.reshape(grid[0] * bm, grid[1] * bn)[:rows, :cols].contiguous(), inv


def dequantize(codes, inv, block=BLOCK):
    rows, cols = codes.shape
    bm, bn = block
    scale = inv.repeat_interleave(bm, 0).repeat_interleave(bn, 1)[:rows, :cols]
    return codes.to(torch.float64) * scale.to(torch.float64)


def edge_values():
    values = [0.0, -0.0, 448.0, -448.0, 464.0, 480.0, 500.0, -1e6, 1e30, float("nan"), float("inf"),
              float("-inf"), 240.0, 256.0, 2.0 ** -6, 2.0 ** -7, 2.0 ** -10, 2.0 ** -11, 1e-30]
    # every subnormal (k / 8 * 2^-6), the midpoints between them, and between normals
    values += [k * 2.0 ** -9 for k in range(1, 8)] + [(k + 0.5) * 2.0 ** -9 for k in range(0, 8)]
    values += [1.0 + (k + 0.5) / 8 for k in range(8)] + [416.0 + 16.0, 432.0]
    gen = torch.Generator().manual_seed(5)
    values += (torch.randn(400, generator=gen) * 100).tolist() + (torch.randn(200, generator=gen) * 0.01).tolist()
    x = torch.tensor(values, dtype=torch.float32)
    clamped = torch.clamp(x, min=-FP8_MAX, max=FP8_MAX).to(torch.float8_e4m3fn).view(torch.uint8)
    raw = x.to(torch.float8_e4m3fn).view(torch.uint8)
    as_json = [v if v == v and abs(v) != float("inf") else str(v) for v in x.tolist()]
    return {"values": as_json, "clamped_codes": clamped.tolist(), "raw_codes": raw.tolist()}


def written(out, source, rows):
    from peft import PeftModel
    model = AutoModelForCausalLM.from_pretrained(out / "written", attn_implementation="eager").eval()
    projection = model.model.layers[0].self_attn.q_proj
    result = {"written_loaded_as": f"{type(projection).__name__} {projection.weight.dtype}"}
    with torch.no_grad():
        result["written_logits"] = [model(input_ids=torch.tensor([ids])).logits[0].double().tolist()
                                    for ids in rows]
    fp8 = AutoModelForCausalLM.from_pretrained(out / "llama3", attn_implementation="eager").eval()
    result["trained_loss_on_fp8"] = mean_nll(PeftModel.from_pretrained(fp8, out / "trained").eval(), rows)
    dense = load_alone(source)
    result["trained_loss_on_original"] = mean_nll(PeftModel.from_pretrained(dense, out / "trained").eval(), rows)
    return result


def load_alone(folder):
    # families/llama3 also holds a LoRA adapter that from_pretrained would apply.
    import tempfile
    with tempfile.TemporaryDirectory() as alone:
        for name in ("config.json", "model.safetensors"):
            shutil.copy(folder / name, alone)
        return AutoModelForCausalLM.from_pretrained(alone, attn_implementation="eager").eval()


def write_checkpoint(folder, source, tensors, fmt, block, quantize_fn):
    """`source` with its projections as codes and scales from `quantize_fn`,
    in `folder`; returns the tensors with the projections dequantised."""
    stored, dense = {}, {}
    for name, t in tensors.items():
        if name.endswith(".weight") and name.rsplit(".", 2)[-2] in PROJECTIONS:
            codes, inv = quantize_fn(t)
            stored[name] = codes
            stored[name[: -len("weight")] + "weight_scale_inv"] = inv
            dense[name] = dequantize(codes, inv, block).to(torch.float32)
        else:
            stored[name] = t
            dense[name] = t
    save_file(stored, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((source / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": fmt, "weight_block_size": block,
                                     "activation_scheme": "dynamic"}
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return dense


E5M2_BLOCK = [24, 16]
E5M2_MAX = 57344.0


def e5m2(out, source, tensors, rows):
    folder = out / "llama3-e5m2"
    folder.mkdir(parents=True, exist_ok=True)
    dense = write_checkpoint(folder, source, tensors, "e5m2", E5M2_BLOCK,
                             lambda t: quantize_blocks(t, E5M2_BLOCK, E5M2_MAX, torch.float8_e5m2))
    reference = reference_tensors(source, dense, rows, "model.layers.0.mlp.gate_proj.weight")
    save_file(reference, str(out / "e5m2.safetensors"))
    values = torch.arange(256, dtype=torch.uint8).view(torch.float8_e5m2).to(torch.float32).tolist()
    summary = {"block": E5M2_BLOCK, "decoded": [v if v == v and abs(v) != float("inf") else str(v) for v in values]}
    try:
        loaded = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
        with torch.no_grad():
            logits = loaded(input_ids=torch.tensor([rows[0]])).logits[0].double()
        projection = loaded.model.layers[0].self_attn.q_proj
        summary["transformers"] = {
            "loaded_as": f"{type(projection).__name__} {projection.weight.dtype}",
            "max_logit_error": (logits - reference["logits.0"]).abs().max().item()}
    except Exception as e:  # what transformers says is the finding
        summary["transformers"] = {"error": f"{type(e).__name__}: {e}"[:300]}
    (out / "e5m2.json").write_text(json.dumps(summary, indent=1) + "\n")


def reference_tensors(source, dense, rows, name):
    """The logits of `rows` from the model of the dequantised projections
    (f64, eager attention), and `name`'s dequantised weight."""
    import tempfile
    with tempfile.TemporaryDirectory() as folder:
        shutil.copy(source / "config.json", Path(folder) / "config.json")
        save_file(dense, str(Path(folder) / "model.safetensors"), metadata={"format": "pt"})
        model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager",
                                                     dtype=torch.float64).eval()
    reference = {}
    with torch.no_grad():
        for i, ids in enumerate(rows):
            reference[f"logits.{i}"] = model(input_ids=torch.tensor([ids])).logits[0].contiguous()
    reference[f"dequantised.{name}"] = dense[name].to(torch.float64).contiguous()
    return reference


def main():
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures")
    source = root / "families" / "llama3"
    out = root / "fp8"
    folder = out / "llama3"
    folder.mkdir(parents=True, exist_ok=True)
    tensors = load_file(str(source / "model.safetensors"))
    dense = write_checkpoint(folder, source, tensors, "e4m3", BLOCK, quantize)

    # Reference logits: the dequantised projections in a dense model, f64.
    rows = json.loads((source / "reference.json").read_text())["rows"]
    reference = reference_tensors(source, dense, rows, "model.layers.1.mlp.down_proj.weight")
    save_file(reference, str(out / "reference.safetensors"))
    summary = {"rows": rows, "block": BLOCK,
               "versions": {"torch": torch.__version__, "transformers": transformers.__version__}}
    (out / "reference.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / "codes.json").write_text(json.dumps(edge_values()) + "\n")
    if (out / "written").exists() and (out / "trained").exists():
        (out / "written.json").write_text(json.dumps(written(out, source, rows), indent=1) + "\n")
    e5m2(out, source, tensors, rows)
    print(json.dumps(summary["versions"]))


if __name__ == "__main__":
    main()

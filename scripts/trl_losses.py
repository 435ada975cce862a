"""Values and gradients of TRL 1.16's preference losses on fixed log-probs.

Writes tests/fixtures/trl-1.16-losses.json, which tests/training/preference_loss.rs
compares lora-runner's losses with. Run it in a venv outside the repository
with TRL 1.16 (see ../shared/peer-bench/README.md):

    python scripts/trl_losses.py > tests/fixtures/trl-1.16-losses.json

TRL's own code computes every number: DPOTrainer._compute_loss (with a stand-in
model whose per-token log-probs are given), CPOTrainer.cpo_loss for SimPO and
ORPOTrainer.odds_ratio_loss for ORPO, in float64, with autograd for gradients.
"""

import json
import sys
from collections import defaultdict
from types import SimpleNamespace

import torch
from accelerate import Accelerator

import trl
from trl import DPOTrainer
from trl.experimental.cpo import CPOTrainer
from trl.experimental.orpo import ORPOTrainer

torch.set_default_dtype(torch.float64)

# The same batch as the Rust tests: three pairs, policy sums, reference sums, lengths.
POLICY_CHOSEN = [-6.0, -8.2, -4.5]
POLICY_REJECTED = [-7.0, -10.0, -3.0]
REFERENCE_CHOSEN = [-6.0, -9.5, -4.0]
REFERENCE_REJECTED = [-7.0, -9.5, -4.0]
CHOSEN_TOKENS = [3, 4, 2]
REJECTED_TOKENS = [2, 5, 3]
BETA, EPS, GAMMA, TAU = 0.5, 0.1, 0.3, 0.05

DPO_LOSSES = ["sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard",
              "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm"]


def batch(sums=None, tilt=0.0):
    """Rows [chosen..., rejected...]: one prompt token, then the completion, right-padded;
    each completion token carries sum/length so the per-row sums are as above. `tilt`
    makes the tokens of a row differ (k-th token + tilt·(k − mean)), the sum unchanged,
    so that LD-DPO's split of a row into shared and tail tokens matters."""
    sums = sums or POLICY_CHOSEN + POLICY_REJECTED
    lengths = CHOSEN_TOKENS + REJECTED_TOKENS
    width = 1 + max(lengths)
    mask = torch.zeros(len(sums), width, dtype=torch.long)
    logps = torch.zeros(len(sums), width - 1)
    for row, (s, n) in enumerate(zip(sums, lengths)):
        mask[row, 1 : 1 + n] = 1
        for k in range(n):
            logps[row, k] = s / n + tilt * (k - (n - 1) / 2)
    return mask, logps.requires_grad_(True)


class StandIn(torch.nn.Module):
    """A model that returns the given per-token log-probs (TRL's fused LM head output)."""

    is_gradient_checkpointing = False

    def __init__(self, log_probs, log_sum_sq_probs=None):
        super().__init__()
        self.log_probs = log_probs
        self.log_sum_sq_probs = log_sum_sq_probs

    def forward(self, **kwargs):
        lp = self.log_probs
        return SimpleNamespace(log_probs=lp, entropy=torch.zeros_like(lp), mean_logits=torch.zeros_like(lp),
                               is_top1=torch.zeros_like(lp, dtype=torch.bool), aux_loss=None,
                               log_sum_sq_probs=self.log_sum_sq_probs)


def per_sum_gradient(log_probs):
    # Every token of a row has the same derivative (the losses see sums), so take the first.
    g = log_probs.grad
    b = len(POLICY_CHOSEN)
    return [g[i, 0].item() for i in range(b)], [g[b + i, 0].item() for i in range(b)]


def sum_sq_probs(log_probs):
    """A log Σ p² for every position (any values below 0 do for TRL's formula)."""
    rows, width = log_probs.shape
    return torch.tensor([[-0.4 - 0.3 * ((3 * r + 5 * k) % 7) for k in range(width)] for r in range(rows)])


def dpo_loss(loss_type, divergence="reverse_kl", alpha_coef=0.5, ld_alpha=None, weighting=False):
    mask, log_probs = batch(tilt=0.0 if ld_alpha is None and not weighting else 0.7)
    trainer = DPOTrainer.__new__(DPOTrainer)
    trainer.model = StandIn(log_probs, sum_sq_probs(log_probs) if weighting else None)
    trainer.accelerator = Accelerator(cpu=True)
    trainer.aux_loss_enabled = False
    trainer.ld_alpha = ld_alpha
    # With LD-DPO the reference's tokens are weighed too: a stand-in reference model.
    trainer.precompute_ref_logps = ld_alpha is None
    if ld_alpha is not None:
        trainer.ref_model = StandIn(batch(REFERENCE_CHOSEN + REFERENCE_REJECTED, tilt=-0.4)[1].detach())
    trainer.f_divergence_type = divergence
    trainer.f_alpha_divergence_coef = alpha_coef
    trainer.loss_types = [loss_type]
    trainer.loss_weights = [1.0]
    trainer.beta = BETA
    trainer.label_smoothing = 0.0 if loss_type == "sigmoid" else EPS
    trainer.use_weighting = weighting
    trainer.args = SimpleNamespace(discopop_tau=TAU, gradient_checkpointing_kwargs=None)
    trainer._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    trainer._total_train_tokens = 0
    trainer._tp_size = 1
    inputs = {
        "input_ids": torch.ones_like(mask),
        "attention_mask": torch.ones_like(mask),
        "completion_mask": mask,
        "ref_chosen_logps": torch.tensor(REFERENCE_CHOSEN),
        "ref_rejected_logps": torch.tensor(REFERENCE_REJECTED),
    }
    loss = trainer._compute_loss(trainer.model, inputs, return_outputs=False)
    try:
        loss.backward()
    except RuntimeError:
        if not weighting:
            raise
        # TRL 1.16's WPO multiplies relu's output in place; autograd refuses
        # it in backward. The value stands.
        return {"value": loss.item(), "label_smoothing": trainer.label_smoothing, "mask": mask.tolist(),
                "policy": log_probs.detach().tolist(), "grad": None,
                "reference_chosen": REFERENCE_CHOSEN, "reference_rejected": REFERENCE_REJECTED,
                "log_sum_sq_probs": trainer.model.log_sum_sq_probs.tolist()}
    if ld_alpha is not None or weighting:
        # Tokens of a row weigh differently: every token's derivative.
        case = {"value": loss.item(), "label_smoothing": trainer.label_smoothing,
                "mask": mask.tolist(), "policy": log_probs.detach().tolist(), "grad": log_probs.grad.tolist()}
        if ld_alpha is not None:
            case["reference"] = trainer.ref_model.log_probs.tolist()
        else:
            case["reference_chosen"], case["reference_rejected"] = REFERENCE_CHOSEN, REFERENCE_REJECTED
        if weighting:
            case["log_sum_sq_probs"] = trainer.model.log_sum_sq_probs.tolist()
        return case
    d_chosen, d_rejected = per_sum_gradient(log_probs)
    return {"value": loss.item(), "d_chosen": d_chosen, "d_rejected": d_rejected,
            "label_smoothing": trainer.label_smoothing}


def means():
    pc = torch.tensor(POLICY_CHOSEN, requires_grad=True)
    pr = torch.tensor(POLICY_REJECTED, requires_grad=True)
    return pc, pr, pc / torch.tensor(CHOSEN_TOKENS, dtype=torch.float64), pr / torch.tensor(
        REJECTED_TOKENS, dtype=torch.float64)


def simpo():
    pc, pr, mc, mr = means()
    cpo = CPOTrainer.__new__(CPOTrainer)
    cpo.alpha, cpo.beta, cpo.label_smoothing = 0.0, BETA, EPS
    cpo.loss_type, cpo.simpo_gamma = "simpo", GAMMA
    cpo.accelerator = Accelerator(cpu=True)
    losses, _, _ = cpo.cpo_loss(mc, mr)
    loss = losses.mean()
    loss.backward()
    return {"value": loss.item(), "d_chosen": pc.grad.tolist(), "d_rejected": pr.grad.tolist(),
            "label_smoothing": EPS}


def orpo():
    pc, pr, mc, mr = means()
    o = ORPOTrainer.__new__(ORPOTrainer)
    o.beta = BETA
    o.accelerator = Accelerator(cpu=True)
    losses, _, _, _, _ = o.odds_ratio_loss(mc, mr)
    # ORPOTrainer: loss = NLL of the chosen tokens (mean per token) − mean(β·log σ(log odds)).
    nll = -pc.sum() / sum(CHOSEN_TOKENS)
    loss = nll - losses.mean()
    loss.backward()
    return {"value": loss.item(), "d_chosen": pc.grad.tolist(), "d_rejected": pr.grad.tolist(),
            "label_smoothing": 0.0}


out = {"trl": trl.__version__, "torch": torch.__version__,
       "batch": {"policy_chosen": POLICY_CHOSEN, "policy_rejected": POLICY_REJECTED,
                 "reference_chosen": REFERENCE_CHOSEN, "reference_rejected": REFERENCE_REJECTED,
                 "chosen_tokens": CHOSEN_TOKENS, "rejected_tokens": REJECTED_TOKENS},
       "params": {"beta": BETA, "simpo_gamma": GAMMA, "discopop_tau": TAU},
       "losses": {name: dpo_loss(name) for name in DPO_LOSSES}}
out["losses"]["simpo"] = simpo()
out["losses"]["orpo"] = orpo()

# f-DPO: every loss that takes a divergence, under each divergence. TRL's
# alpha_divergence clamps in the compute dtype and has no float64 clamp, so it
# runs in float32 (compared at float32's precision); α = 1 is its reverse-KL
# limit, α = -200 saturates the clamp on this batch.
F_LOSSES = ["sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft"]
divergences = []
for divergence, coef in [("forward_kl", 0.5), ("js_divergence", 0.5), ("alpha_divergence", 0.5),
                         ("alpha_divergence", 1.0), ("alpha_divergence", -200.0)]:
    float32 = divergence == "alpha_divergence"
    torch.set_default_dtype(torch.float32 if float32 else torch.float64)
    for name in F_LOSSES:
        if coef == -200.0 and name not in ("sigmoid", "hinge"):
            continue  # exp(−βΔ) and squares overflow float32 there
        case = dpo_loss(name, divergence, coef)
        case.update({"loss": name, "f_divergence_type": divergence, "f_alpha_divergence_coef": coef,
                     "float32": float32})
        divergences.append(case)
torch.set_default_dtype(torch.float64)
out["divergences"] = divergences

# LD-DPO: per-token log-probs that differ within a row, policy and reference weighed alike.
out["ld_alpha"] = []
for ld_alpha in [0.0, 0.5, 1.0]:
    for name in ["sigmoid", "ipo", "hinge"]:
        case = dpo_loss(name, ld_alpha=ld_alpha)
        case.update({"loss": name, "ld_alpha": ld_alpha})
        out["ld_alpha"].append(case)

# WPO: per-pair weights from the policy's per-token log-probs against log Σ p²,
# held constant; with LD-DPO too (WPO reads the unweighted log-probs). TRL 1.16
# multiplies the per-pair losses in place (`per_sequence_loss *= ...`): for
# hinge autograd then refuses the backward (the value is kept, "grad" is null),
# and for sft (an expanded scalar) even the forward fails, so sft is left out.
out["use_weighting"] = []
for name, ld_alpha in [("sigmoid", None), ("ipo", None), ("robust", None), ("hinge", None), ("sigmoid", 0.5)]:
    case = dpo_loss(name, ld_alpha=ld_alpha, weighting=True)
    case.update({"loss": name, "ld_alpha": ld_alpha})
    out["use_weighting"].append(case)
json.dump(out, sys.stdout, indent=1)
print()

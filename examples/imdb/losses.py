"""Preference losses on sequence log-probabilities: AOT (from otloss) and the DPO, IPO, KTO baselines.

Every function takes the policy and reference log-probabilities of the chosen
(desirable) and rejected (undesirable) completions of one batch and returns a
scalar loss. The paired methods (``aot_paired``, ``dpo``, ``ipo``) need one
rejected completion per chosen one; the unpaired ones (``aot_unpaired``, ``kto``)
take two independent samples.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

import otloss

__all__ = ["METHODS", "REFERENCE", "Method", "aot_paired", "aot_unpaired", "colors", "dpo", "ipo", "kto", "label"]

LossFn = Callable[[Tensor, Tensor, Tensor, Tensor, float], Tensor]


def aot_paired(pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor, beta: float) -> Tensor:
    """pAOT: the sorted policy margins must dominate the sorted reference margins (logistic cost)."""
    return otloss.aot_loss(pc, pr, rc, rr, paired=True, beta=beta)


def aot_unpaired(pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor, beta: float) -> Tensor:
    """uAOT: sorted chosen log-ratios must dominate sorted rejected log-ratios (logistic cost)."""
    return otloss.aot_loss(pc, pr, rc, rr, paired=False, beta=beta)


def dpo(pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor, beta: float) -> Tensor:
    """DPO (Rafailov et al.): ``-log sigmoid(beta * ((pc - rc) - (pr - rr)))`` per pair."""
    return -F.logsigmoid(beta * ((pc - rc) - (pr - rr))).mean()


def ipo(pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor, beta: float) -> Tensor:
    """IPO (Azar et al.): ``((pc - rc) - (pr - rr) - 1 / (2 beta))^2`` per pair."""
    return (((pc - rc) - (pr - rr)) - 1.0 / (2.0 * beta)).pow(2).mean()


def kto(pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor, beta: float) -> Tensor:
    """KTO (Ethayarajh et al.) with unit weights for desirable and undesirable samples.

    The reference point ``z`` is the batch mean of all policy/reference log-ratios,
    detached and clamped at 0 (TRL estimates it on mismatched prompt/completion
    pairs instead, which costs an extra forward pass).
    """
    chosen, rejected = pc - rc, pr - rr
    z = torch.cat([chosen, rejected]).mean().detach().clamp(min=0)
    losses = torch.cat([1 - torch.sigmoid(beta * (chosen - z)), 1 - torch.sigmoid(beta * (z - rejected))])
    return losses.mean()


@dataclass(frozen=True)
class Method:
    """One alignment method of the demo: its loss, how its batches are drawn and how it is shown."""

    name: str
    label: str
    loss: LossFn
    paired: bool  # True: batches of preference pairs; False: independent desirable and undesirable samples
    sorts_batch: bool  # True: the loss sorts over the batch (AOT), so the batch size sets the quantile estimate
    color: str


# The one registry of methods: the CLI, the pipeline, the plots and the batch-size ablation read it.
METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("aot_paired", "AOT paired", aot_paired, paired=True, sorts_batch=True, color="tab:green"),
        Method("aot_unpaired", "AOT unpaired", aot_unpaired, paired=False, sorts_batch=True, color="tab:olive"),
        Method("dpo", "DPO", dpo, paired=True, sorts_batch=False, color="tab:blue"),
        Method("ipo", "IPO", ipo, paired=True, sorts_batch=False, color="tab:purple"),
        Method("kto", "KTO", kto, paired=False, sorts_batch=False, color="tab:orange"),
    )
}
REFERENCE = "reference"  # the name and label of the unaligned reference policy in tables and plots
REFERENCE_COLOR = "black"


def label(name: str) -> str:
    """Display label of a method name, or of ``"reference"``."""
    return REFERENCE if name == REFERENCE else METHODS[name].label


def colors() -> dict[str, str]:
    """Plot colour per display label, the reference included."""
    return {REFERENCE: REFERENCE_COLOR, **{m.label: m.color for m in METHODS.values()}}

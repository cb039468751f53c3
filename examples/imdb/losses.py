"""Preference losses of the demo: AOT and PLOT (from otloss) and the DPO, IPO, KTO baselines.

Every function takes the policy and reference log-probabilities of the chosen
(desirable) and rejected (undesirable) completions of one batch and returns a
scalar loss. The paired methods (``aot_paired``, ``dpo``, ``ipo``, ``plot_dpo``,
``plot_aot``) need one rejected completion per chosen one; the unpaired ones
(``aot_unpaired``, ``kto``) take two independent samples.

The PLOT methods (``plot_dpo``, ``plot_aot``: ``otloss.plot_loss`` with base DPO or
paired AOT) also need the policy's logits over the completion tokens, their labels
and the token embedding matrix: a :class:`TokenBatch`. Only the methods whose
:attr:`Method.needs_tokens` is set get one, so the others cost what they did.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

import otloss

__all__ = [
    "METHODS",
    "PLOT_ALPHA",
    "REFERENCE",
    "Method",
    "TokenBatch",
    "aot_paired",
    "aot_unpaired",
    "colors",
    "dpo",
    "ipo",
    "kto",
    "label",
    "plot_aot",
    "plot_dpo",
]

LossFn = Callable[..., Tensor]

#: Weight of the token-level term in ``L = L_base + alpha * L_PLOT`` (``--plot-alpha``). 1.0 is
#: ``otloss.plot_loss``'s default: the PLOT abstract gives no value, and none was tuned here.
PLOT_ALPHA = 1.0


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
class TokenBatch:
    """What the PLOT losses need beyond sequence log-probabilities.

    Attributes:
        chosen_logits: ``[B, L, V]`` policy logits predicting the ``L`` chosen completion tokens.
        chosen_labels: ``[B, L]`` the chosen completion tokens (the shifted labels of ``chosen_logits``).
        rejected_logits: ``[B, L, V]`` likewise for the rejected completions.
        rejected_labels: ``[B, L]`` the rejected completion tokens.
        embeddings: ``[V, D]`` the policy's input token embeddings, detached: the transport cost's geometry.
    """

    chosen_logits: Tensor
    chosen_labels: Tensor
    rejected_logits: Tensor
    rejected_labels: Tensor
    embeddings: Tensor


def _plot(base: str, pc, pr, rc, rr, beta: float, tokens: TokenBatch, alpha: float) -> Tensor:
    if not isinstance(tokens, TokenBatch):
        raise TypeError(f"tokens must be a TokenBatch, got {type(tokens).__name__}")
    return otloss.plot_loss(
        tokens.chosen_logits,
        tokens.chosen_labels,
        tokens.rejected_logits,
        tokens.rejected_labels,
        tokens.embeddings,
        ref_chosen_logps=rc,
        ref_rejected_logps=rr,
        policy_chosen_logps=pc,
        policy_rejected_logps=pr,
        base=base,
        alpha=alpha,
        beta=beta,
        aot_kwargs={"paired": True} if base == "aot" else None,
    )


def plot_dpo(
    pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor, beta: float, tokens: TokenBatch, alpha: float = PLOT_ALPHA
) -> Tensor:
    """PLOT on top of DPO: ``dpo(...) + alpha * L_PLOT`` with ``otloss.plot_loss(base="dpo")``.

    ``L_PLOT`` is otloss's reading of PLOT (``docs/plot.md``), at its defaults: sequence-mode
    entropic OT (``epsilon`` 0.05) between each completion's expected ("soft") token
    embeddings and its label embeddings, cost ``1 - cos``, pulling the chosen completions
    toward their tokens and pushing the rejected ones away up to a hinge margin of 1. The
    base term equals :func:`dpo` on the same ``pc, pr, rc, rr``.
    """
    return _plot("dpo", pc, pr, rc, rr, beta, tokens, alpha)


def plot_aot(
    pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor, beta: float, tokens: TokenBatch, alpha: float = PLOT_ALPHA
) -> Tensor:
    """PLOT on top of paired AOT: ``aot_paired(...) + alpha * L_PLOT`` with ``otloss.plot_loss(base="aot")``.

    The same ``L_PLOT`` as :func:`plot_dpo`; the base term equals :func:`aot_paired` (same ``beta``).
    """
    return _plot("aot", pc, pr, rc, rr, beta, tokens, alpha)


@dataclass(frozen=True)
class Method:
    """One alignment method of the demo: its loss, how its batches are drawn and how it is shown."""

    name: str
    label: str
    loss: LossFn
    paired: bool  # True: batches of preference pairs; False: independent desirable and undesirable samples
    sorts_batch: bool  # True: the loss sorts over the batch (AOT), so the batch size sets the quantile estimate
    color: str
    # True: the loss also takes a TokenBatch and the PLOT weight, ``loss(pc, pr, rc, rr, beta, tokens, alpha)``
    needs_tokens: bool = False


# The one registry of methods: the CLI, the pipeline, the plots and the multi-seed experiment read it.
METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("aot_paired", "AOT paired", aot_paired, paired=True, sorts_batch=True, color="tab:green"),
        Method("aot_unpaired", "AOT unpaired", aot_unpaired, paired=False, sorts_batch=True, color="tab:olive"),
        Method("dpo", "DPO", dpo, paired=True, sorts_batch=False, color="tab:blue"),
        Method("ipo", "IPO", ipo, paired=True, sorts_batch=False, color="tab:purple"),
        Method("kto", "KTO", kto, paired=False, sorts_batch=False, color="tab:orange"),
        Method("plot_dpo", "PLOT + DPO", plot_dpo, paired=True, sorts_batch=False, color="tab:cyan", needs_tokens=True),
        Method(
            "plot_aot", "PLOT + AOT paired", plot_aot, paired=True, sorts_batch=True, color="tab:red", needs_tokens=True
        ),
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

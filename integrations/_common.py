"""What the TRL and Lightning adapters share: the loss module, the PLOT term, class counts, gathers, metrics, a tiny model.

Needs only torch at import time (``transformers`` only inside :func:`tiny_causal_lm`).

Metric convention (both adapters): ``rewards/chosen`` and ``rewards/rejected`` are
TRL's implicit rewards ``beta * (logp_policy - logp_ref)``, averaged over the chosen
(desirable) and rejected (undesirable) completions; ``rewards/margins`` and
``rewards/accuracies`` compare them. The FSD diagnostics are in log-ratio units
(not multiplied by ``beta``), on the two distributions the loss compares. With PLOT on,
``plot/term`` is ``L_PLOT`` (before the factor ``alpha``) and ``plot/chosen_ot``,
``plot/rejected_ot`` the mean token-OT costs of the chosen and rejected responses.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from otloss._validation import as_bool
from otloss.diagnostics import fsd_report
from otloss.distributed import QuantileMemory, all_gather_variable
from otloss.functional import AOT_DEFAULT_BETA
from otloss.modules import AOTLoss
from otloss.tokens import PLOTLoss, PLOTOutput

__all__ = [
    "DEFAULT_BETA",
    "aot_uv",
    "build_plot",
    "gather_logps",
    "has_both_classes",
    "input_embeddings",
    "install_hint",
    "loss_module",
    "plot_term",
    "preference_metrics",
    "split_logps",
    "tiny_causal_lm",
    "world_size",
]

DEFAULT_BETA = AOT_DEFAULT_BETA  # what beta=None means in otloss.aot_loss: the AOT paper's value


def install_hint(extra: str) -> str:
    """The install command for an extra of this project (distribution ``torch-otloss``, import name ``otloss``)."""
    return f'pip install "torch-otloss[{extra}]" (or pip install -e ".[{extra}]" from a checkout)'


def world_size(group: object = None) -> int:
    """Ranks in ``group`` (the default group when ``None``); 1 when ``torch.distributed`` is not initialised."""
    dist = torch.distributed
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def loss_module(*, global_batch: object = False, accumulate_quantiles: object = False, **options: object) -> AOTLoss:
    """The one :class:`otloss.AOTLoss` of an adapter, for training and evaluation, on one rank or many.

    ``global_batch=True`` becomes the core's ``"auto"`` (sort across ranks only when an
    initialised group has several ranks; the local loss otherwise), and
    ``accumulate_quantiles=True`` gives it a :class:`otloss.QuantileMemory`, which
    :class:`otloss.AOTLoss` uses in training mode only. Every option is checked now.
    """
    memory = QuantileMemory() if as_bool(accumulate_quantiles, "accumulate_quantiles") else None
    return AOTLoss(global_batch="auto" if global_batch is True else global_batch, memory=memory, **options)


def has_both_classes(loss: AOTLoss, n_chosen: int, n_rejected: int, device: torch.device | str) -> bool:
    """Whether the batch ``loss`` sorts (all ranks' when it is global) has a chosen and a rejected sample.

    A collective when ``loss.is_global()``: every rank must call it.
    """
    counts = torch.tensor([n_chosen, n_rejected], device=device)
    if loss.is_global():
        torch.distributed.all_reduce(counts, group=loss.group)
    return bool((counts > 0).all())


def split_logps(policy: Tensor, ref: Tensor, chosen: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(policy_chosen, policy_rejected, ref_chosen, ref_rejected)`` from ``[rows]`` log-probabilities and a bool mask."""
    return policy[chosen], policy[~chosen], ref[chosen], ref[~chosen]


def build_plot(
    alpha: float, mode: str, cost: str, epsilon: float, margin: float | None, embedding_grad: bool
) -> PLOTLoss | None:
    """The PLOT term an adapter adds to its loss, ``alpha * L_PLOT`` (:class:`otloss.PLOTLoss` with ``base=None``).

    Validates every option now. Returns ``None`` when ``alpha == 0``: PLOT is off and the
    adapter's loss is exactly the one without it. The push is the core's bounded hinge
    (see ``docs/plot.md``).
    """
    if cost != "cosine" and margin is None:
        raise ValueError(
            f"plot_margin must be given with plot_cost={cost!r}; the default margin 1.0 is the cosine cost's"
        )
    options = dict(mode=mode, cost=cost, epsilon=epsilon, margin=margin, embedding_grad=embedding_grad)
    loss = PLOTLoss(base=None, alpha=alpha, return_components=True, **options)
    return loss if alpha else None


def input_embeddings(model: torch.nn.Module) -> Tensor:
    """The model's input embedding matrix ``[V, D]`` (gathered whole when FSDP2 shards it)."""
    weight = model.get_input_embeddings().weight
    return weight.full_tensor() if hasattr(weight, "full_tensor") else weight


def plot_term(plot: PLOTLoss, logits: Tensor, labels: Tensor, chosen: Tensor, embeddings: Tensor) -> PLOTOutput | None:
    """``plot``'s term for one batch of responses, computed on the logits the policy forward made.

    Args:
        plot: from :func:`build_plot`.
        logits: ``[rows, T, V]`` policy logits; a view such as ``logits[:, :-1]`` is read in place.
        labels: ``[rows, T]`` their shifted labels, ``-100`` on prompt and padding.
        chosen: ``[rows]`` bool, True for the chosen (desirable) responses, False for the rejected.
        embeddings: ``[V, D]``, e.g. :func:`input_embeddings`.

    Returns:
        The :class:`otloss.PLOTOutput` (``.loss`` is ``alpha * L_PLOT``), or ``None`` when the batch
        lacks a chosen or a rejected response. Each side is the whole ``logits`` with the other side's
        labels set to ``-100``, which the core skips: no row of the logits is copied.
    """
    if chosen.all() or not chosen.any():
        return None
    side = chosen.to(labels.device)[:, None]
    return plot(logits, labels.masked_fill(~side, -100), logits, labels.masked_fill(side, -100), embeddings)


def aot_uv(logps: Sequence[Tensor], paired: bool) -> tuple[Tensor, Tensor]:
    """The loss's ``u`` (pushed to dominate) and ``v`` from ``(policy_chosen, policy_rejected, ref_chosen, ref_rejected)``.

    Paired: policy margins and reference margins; unpaired: chosen and rejected log-ratios.
    The loss builds them itself inside :func:`otloss.aot_loss`; the adapters need them
    only for the diagnostics and plots.
    """
    pc, pr, rc, rr = logps
    return (pc - pr, rc - rr) if paired else (pc - rc, pr - rr)


def gather_logps(logps: Sequence[Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(policy_chosen, policy_rejected, ref_chosen, ref_rejected)`` of every rank, detached, in rank order.

    Sizes may differ across ranks (:func:`otloss.all_gather_variable`, two gathers);
    pairs stay aligned. A collective with several ranks: every rank must call it. In
    one process it returns the detached tensors.
    """
    pc, pr, rc, rr = (t.detach() for t in logps)
    if world_size() == 1:
        return pc, pr, rc, rr
    chosen, rejected = all_gather_variable(torch.stack([pc, rc])), all_gather_variable(torch.stack([pr, rr]))
    return chosen[0], rejected[0], chosen[1], rejected[1]


def preference_metrics(
    logps: Sequence[Tensor],
    *,
    beta: float,
    pairs: bool,
    paired: bool,
    fsd_quantiles: Sequence[float] | None = None,
) -> dict[str, float]:
    """``rewards/*``, ``logps/*`` and the FSD diagnostics of one batch, in TRL's units.

    Args:
        logps: ``(policy_chosen, policy_rejected, ref_chosen, ref_rejected)``, detached
            (gathered over ranks first if wanted); ``[B]`` each when ``pairs``, else
            ``[n]``, ``[n]``, ``[m]``, ``[m]`` (either may be empty).
        beta: the reward scale: ``reward = beta * (logp_policy - logp_ref)``.
        pairs: the rows are (chosen, rejected) pairs: ``rewards/accuracies`` is the
            fraction of pairs ranked correctly and ``rewards/margins`` the mean reward
            difference. Otherwise the fraction of all (desirable, undesirable) pairs
            ranked correctly and the difference of the class means.
        paired: the loss is paired (FSD diagnostics of the policy margins over the
            reference margins) or unpaired (chosen over rejected log-ratios).
        fsd_quantiles: levels of ``quantile_margin_<t>``; ``None``: no FSD diagnostics.

    Returns:
        Keys present when their data is: ``rewards/chosen``, ``rewards/rejected``,
        ``logps/chosen``, ``logps/rejected``, ``rewards/accuracies``,
        ``rewards/margins`` and the keys of :func:`otloss.fsd_report` (skipped when a
        side is empty or not finite).
    """
    pc, pr, rc, rr = logps
    chosen, rejected = beta * (pc - rc), beta * (pr - rr)
    out: dict[str, float] = {}
    for name, rewards, policy in (("chosen", chosen, pc), ("rejected", rejected, pr)):
        if rewards.numel():
            out[f"rewards/{name}"] = rewards.mean().item()
            out[f"logps/{name}"] = policy.mean().item()
    if not (chosen.numel() and rejected.numel()):
        return out
    if pairs:
        out["rewards/accuracies"] = (chosen > rejected).float().mean().item()
        out["rewards/margins"] = (chosen - rejected).mean().item()
    else:
        out["rewards/accuracies"] = (chosen[:, None] > rejected[None, :]).float().mean().item()
        out["rewards/margins"] = (chosen.mean() - rejected.mean()).item()
    if fsd_quantiles is not None:
        u, v = (t.float().cpu() for t in aot_uv(logps, paired))
        if torch.isfinite(u).all() and torch.isfinite(v).all():
            out.update(fsd_report(u, v, fsd_quantiles))
    return out


def tiny_causal_lm(seed: int = 0, vocab_size: int = 64):
    """A two-layer ``transformers.LlamaForCausalLM`` built from a config, whose weights depend only on ``seed``.

    The one tiny model of the tests and the offline examples (a few thousand
    parameters; token ids 0, 1, 2 are pad, BOS and EOS). Leaves the global torch RNG
    seeded with ``seed``.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)

r"""Token-level optimal-transport losses with token-embedding costs, and the PLOT preference loss.

PLOT ("Preference Learning via Optimal Transport", arXiv 2604.01837) is public only as an
abstract: a token-level loss derived from optimal transport, with a transport cost built from
token embeddings, added to a fine-tuning objective. This module implements one reading of it
(see ``docs/plot.md``), from building blocks that make other readings one option away:

* :func:`token_ot_loss`: OT between what the model predicts and the label tokens, in the
  geometry of an embedding matrix. ``mode="position"`` transports each position's predicted
  distribution onto the Dirac at its label (closed form); ``mode="sequence"`` transports the
  cloud of a sequence's expected ("soft") embeddings onto the cloud of its label embeddings
  (entropic OT, Chen et al. 2019, "Improving Sequence-to-Sequence Learning via Optimal
  Transport", arXiv 1901.06283).
* :func:`plot_loss`: ``L = L_base + alpha * L_PLOT`` with ``L_base`` one of DPO, AOT, SFT or
  nothing, and ``L_PLOT`` pulling chosen responses toward their tokens and pushing rejected
  ones away, with a bounded push.

Memory: the only pass over the vocabulary is ``softmax(logits) @ table`` (``table [V, K]``,
``K = D`` or ``D + 1``), computed in chunks of positions by one autograd node that keeps no
softmax: its backward recomputes each chunk. Beyond the inputs and the gradient of the logits,
at most a few ``[chunk, V]`` float32 buffers are alive at a time.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from otloss._validation import check_finite, compute_dtype, integer, real_number, resolve_validate

__all__ = ["PLOTLoss", "PLOTOutput", "TokenOTLoss", "plot_loss", "token_ot_loss"]

Mode = Literal["position", "sequence"]
TokenCost = Literal["cosine", "sqeuclidean"]
Reduction = Literal["none", "mean", "sum"]
Base = Literal["dpo", "aot", "sft"] | None
Push = Literal["hinge", "logistic"]

_MODES = ("position", "sequence")
_COSTS = ("cosine", "sqeuclidean")
_BASES = ("dpo", "aot", "sft", None)
_PUSHES = ("hinge", "logistic")
_CHUNK_ELEMENTS = 1 << 24  # default chunk: about 16M float32 logits (64 MiB) per [chunk, V] buffer


# --------------------------------------------------------------------------------------------
# The one pass over the vocabulary
# --------------------------------------------------------------------------------------------


class _Rows:
    """The positions ``(rows, cols)`` of a ``[B, T, V]`` tensor as rows of a 2-D view, for fast copies.

    ``index_select`` / ``index_copy_`` of whole rows of a ``[R, V]`` view is several times faster than
    advanced indexing with two index tensors. The view exists when the last dimension is contiguous
    and the batch stride is a multiple of the position stride (true of contiguous logits and of
    slices such as ``logits[:, :-1]``); otherwise advanced indexing is used.
    """

    def __init__(self, x: Tensor, rows: Tensor, cols: Tensor) -> None:
        self.rows, self.cols = rows, cols
        self.flat = None
        B, T, V = x.shape
        sB, sT, sV = x.stride()
        if sV != 1 or rows.numel() == 0:
            return
        if T == 1:
            step_b, step_t, rs = 1, 0, sB
        elif B == 1:
            step_b, step_t, rs = 0, 1, sT
        elif sT > 0 and sB % sT == 0:
            step_b, step_t, rs = sB // sT, 1, sT
        else:
            return
        self.flat = rows * step_b + cols * step_t
        self.shape = ((B - 1) * step_b + (T - 1) * step_t + 1, V)
        self.stride = (rs, 1)

    def _view(self, x: Tensor) -> Tensor:
        return x.as_strided(self.shape, self.stride, x.storage_offset())

    def get(self, x: Tensor, s: int, chunk: int, dtype: torch.dtype) -> Tensor:
        """Rows ``s : s + chunk`` as a new ``[c, V]`` tensor in ``dtype``."""
        if self.flat is None:
            out = x[self.rows[s : s + chunk], self.cols[s : s + chunk]]
        else:
            out = self._view(x).index_select(0, self.flat[s : s + chunk])
        return out.to(dtype)

    def put(self, x: Tensor, s: int, chunk: int, values: Tensor) -> None:
        """Write ``values [c, V]`` at rows ``s : s + chunk`` of ``x`` (a tensor with the strides of the source)."""
        if self.flat is None:
            x[self.rows[s : s + chunk], self.cols[s : s + chunk]] = values
        else:
            self._view(x).index_copy_(0, self.flat[s : s + chunk], values)


class _SoftEmbedding(torch.autograd.Function):
    """``(softmax(x) @ table, log_softmax(x)[label])`` for the positions ``(rows, cols)`` of ``logits``.

    Forward and backward loop over chunks of positions; nothing of size ``[N, V]`` is saved:
    the backward recomputes each chunk's softmax from the logits. Per chunk the forward makes
    four elementwise passes over ``[c, V]`` (gather, max, shift, exp and sum) and one matmul; the
    backward the same plus one matmul and two passes (``e * (g - coef)``), with the normalisation
    ``1 / z`` folded into ``[c, K]`` and ``[c]`` factors.
    """

    @staticmethod
    def forward(ctx, logits, table, rows, cols, targets, chunk):  # type: ignore[override]
        cdt = table.dtype
        n = rows.numel()
        soft = torch.empty((n, table.shape[1]), dtype=cdt, device=logits.device)
        logp = torch.empty((n,), dtype=cdt, device=logits.device)
        index = _Rows(logits, rows, cols)
        for s in range(0, n, chunk):
            x = index.get(logits, s, chunk, cdt)
            x.sub_(x.amax(-1, keepdim=True))  # by the maximum, not logsumexp: ties of huge logits stay exact
            x_y = x.gather(1, targets[s : s + chunk, None]).squeeze(1)
            e = x.exp_()
            z = e.sum(-1)
            logp[s : s + chunk] = x_y - z.log()
            torch.matmul(e, table, out=soft[s : s + chunk])
            soft[s : s + chunk] /= z[:, None]
        ctx.save_for_backward(logits, table, rows, cols, targets, soft)
        ctx.chunk = chunk
        ctx.set_materialize_grads(False)
        return soft, logp

    @staticmethod
    @once_differentiable
    def backward(ctx, g_soft, g_logp):  # type: ignore[override]
        logits, table, rows, cols, targets, soft = ctx.saved_tensors
        chunk = ctx.chunk
        cdt = table.dtype
        want_logits, want_table = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_logits = torch.zeros(logits.shape, dtype=logits.dtype, device=logits.device) if want_logits else None
        grad_table = torch.zeros_like(table) if (want_table and g_soft is not None) else None
        if (g_soft is None and g_logp is None) or not (want_logits or grad_table is not None):
            return grad_logits, grad_table, None, None, None, None
        index = _Rows(logits, rows, cols)
        out_index = _Rows(grad_logits, rows, cols) if want_logits else None
        for s in range(0, rows.numel(), chunk):
            x = index.get(logits, s, chunk, cdt)
            x.sub_(x.amax(-1, keepdim=True))
            e = x.exp_()
            inv_z = e.sum(-1).reciprocal()
            # With p = e / z and G = g_soft @ table^T:
            #   d<g_soft, p @ table>/dx = p * (G - <p, G>),  <p, G> = <p @ table, g_soft> = <soft, g_soft>
            #   d(g_logp * log p_y)/dx  = g_logp * (onehot(y) - p)
            # so the gradient is e * ((g_soft / z) @ table^T - coef) + g_logp * onehot(y),
            # coef = (<soft, g_soft> + g_logp) / z.
            coef = torch.zeros_like(inv_z)
            if g_soft is not None:
                gs = g_soft[s : s + chunk] * inv_z[:, None]
                if grad_table is not None:
                    grad_table.addmm_(e.T, gs)
                if not want_logits:
                    continue
                g = gs @ table.T
                coef += (soft[s : s + chunk] * g_soft[s : s + chunk]).sum(-1) * inv_z
            elif not want_logits:
                continue
            else:
                g = None
            if g_logp is not None:
                coef += g_logp[s : s + chunk] * inv_z
            g = e.mul_(-coef[:, None]) if g is None else g.sub_(coef[:, None]).mul_(e)
            if g_logp is not None:
                g.scatter_add_(1, targets[s : s + chunk, None], g_logp[s : s + chunk, None])
            out_index.put(grad_logits, s, chunk, g.to(grad_logits.dtype))
        return grad_logits, grad_table, None, None, None, None


# --------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------


def _check_logits(logits: object, name: str) -> Tensor:
    if not isinstance(logits, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(logits).__name__}")
    if not logits.is_floating_point():
        raise TypeError(f"{name} must have a floating-point dtype, got {logits.dtype}")
    if logits.dim() != 3:
        raise ValueError(f"{name} must have shape [batch, seq_len, vocab], got a tensor of shape {tuple(logits.shape)}")
    if logits.numel() == 0:
        raise ValueError(f"{name} must be non-empty, got a tensor of shape {tuple(logits.shape)}")
    return logits


def _check_labels(labels: object, logits: Tensor, name: str, logits_name: str) -> Tensor:
    if not isinstance(labels, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(labels).__name__}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"{name} must have an integer dtype (token ids), got {labels.dtype}")
    if tuple(labels.shape) != tuple(logits.shape[:2]):
        raise ValueError(
            f"{name} must have the shape [batch, seq_len] = {tuple(logits.shape[:2])} of {logits_name}, "
            f"got {tuple(labels.shape)} (labels are already shifted: labels[b, t] is the target of logits[b, t])"
        )
    if labels.device != logits.device:
        raise ValueError(f"{name} must be on the device of {logits_name} ({logits.device}), got {labels.device}")
    return labels


def _check_embeddings(embeddings: object, vocab: int, device: torch.device, logits_name: str) -> Tensor:
    if not isinstance(embeddings, Tensor):
        raise TypeError(f"embeddings must be a torch.Tensor, got {type(embeddings).__name__}")
    if not embeddings.is_floating_point():
        raise TypeError(f"embeddings must have a floating-point dtype, got {embeddings.dtype}")
    if embeddings.dim() != 2 or embeddings.numel() == 0:
        raise ValueError(f"embeddings must have shape [vocab, dim] with both > 0, got {tuple(embeddings.shape)}")
    if embeddings.shape[0] != vocab:
        raise ValueError(
            f"embeddings must have one row per vocabulary entry of {logits_name} (vocab = {vocab}), "
            f"got {embeddings.shape[0]} rows; pass the model's input or output embedding matrix, and slice it "
            "(embeddings[:vocab]) if the model pads its embedding table beyond the logits"
        )
    if embeddings.device != device:
        raise ValueError(f"embeddings must be on the device of {logits_name} ({device}), got {embeddings.device}")
    return embeddings


def _check_number(x: object, name: str, *, positive: bool = False, allow_zero: bool = True) -> float:
    x = real_number(x, name)
    if x < 0 or (x == 0 and not allow_zero) or (positive and x <= 0):
        what = "a finite number > 0" if (positive or not allow_zero) else "a finite number >= 0"
        raise ValueError(f"{name} must be {what}, got {x}")
    return x


def _check_options(mode, cost, epsilon, ignore_index, reduction, chunk_size, embedding_grad, solver_options):
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {list(_MODES)}, got {mode!r}")
    if cost not in _COSTS:
        raise ValueError(f"cost must be one of {list(_COSTS)}, got {cost!r}")
    _check_number(epsilon, "epsilon")
    integer(ignore_index, "ignore_index")
    if reduction not in ("none", "mean", "sum"):
        raise ValueError(f"reduction must be 'none', 'mean' or 'sum', got {reduction!r}")
    if not isinstance(embedding_grad, bool):
        raise TypeError(f"embedding_grad must be a bool, got {type(embedding_grad).__name__}")
    if chunk_size is not None:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
            raise TypeError(f"chunk_size must be an int or None, got {type(chunk_size).__name__}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1 (positions per chunk), got {chunk_size}")
    if solver_options is not None:
        if not isinstance(solver_options, dict):
            raise TypeError(f"solver_options must be a dict or None, got {type(solver_options).__name__}")
        taken = sorted({"cost", "a", "b", "epsilon", "return_plan"} & set(solver_options))
        if taken:
            raise ValueError(
                f"solver_options cannot set {taken}: token_ot_loss sets them (epsilon is its own argument)"
            )
    return chunk_size


def _diagnose(logits: Tensor, embeddings: Tensor, rows: Tensor, cols: Tensor, chunk: int, name: str) -> None:
    """The loss is not finite: raise a ValueError naming the input that made it so.

    Run only then, so that finite inputs cost no extra pass (any NaN/Inf in the embeddings or in
    the logits of a counted position makes the loss non-finite).
    """
    check_finite(embeddings, "embeddings")
    n_nan = n_pinf = n_dead = 0
    for s in range(0, rows.numel(), chunk):
        x = logits[rows[s : s + chunk], cols[s : s + chunk]]
        n_nan += int(torch.isnan(x).sum())
        n_pinf += int(torch.isposinf(x).sum())
        n_dead += int((x == float("-inf")).all(-1).sum())
    if n_nan or n_pinf or n_dead:
        raise ValueError(
            f"{name} at non-ignored positions contain {n_nan} NaN and {n_pinf} +Inf values and {n_dead} rows "
            "that are -Inf everywhere, so the predicted distribution is undefined; pass finite logits (-Inf is "
            "allowed for masked vocabulary entries while a row keeps one finite value), or ignore those positions"
        )
    raise ValueError(
        "token_ot_loss is not finite although the logits and embeddings are: the token cost overflowed "
        "(embeddings too large for the squared Euclidean cost in float32?) or, in mode='sequence', the "
        "entropic solver failed (try a larger epsilon)"
    )


# --------------------------------------------------------------------------------------------
# token_ot_loss
# --------------------------------------------------------------------------------------------


class _TokenOT(NamedTuple):
    per_seq: Tensor  # [B] loss per sequence (0 where no position counts), compute dtype
    logps: Tensor  # [B] sum of log p(label) over counted positions, compute dtype
    counts: Tensor  # [B] number of counted positions (long)


def _cost_table(embeddings: Tensor, cost: str, mode: str, cdt: torch.dtype) -> tuple[Tensor, Tensor]:
    """``(table [V, K], label_table [V, D])``: what the soft pass averages, and what labels look up."""
    e = embeddings.to(cdt)
    if cost == "sqeuclidean":
        e = e - e.mean(0, keepdim=True)  # translation invariant; centring reduces cancellation
        if mode == "position":
            return torch.cat([e, e.square().sum(-1, keepdim=True)], dim=1), e
        return e, e
    if mode == "position":
        e = F.normalize(e, dim=-1)
    return e, e


def _token_ot(
    logits: Tensor,
    labels: Tensor,
    embeddings: Tensor,
    *,
    mode: str,
    cost: str,
    epsilon: float,
    ignore_index: int,
    embedding_grad: bool,
    chunk_size: int | None,
    solver_options: dict | None,
    validate: bool,
    logits_name: str,
    labels_name: str,
) -> _TokenOT:
    """Checked inputs -> per-sequence values, summed label log-probabilities and position counts."""
    B, _, V = logits.shape
    if logits.device.type == "meta":
        raise ValueError(
            f"{logits_name} is on the meta device: the token losses select positions by the values of "
            f"{labels_name}, which meta tensors do not have; call them on tensors with values"
        )
    cdt = compute_dtype(logits.dtype)
    mask = labels != ignore_index
    if validate:
        bad = mask & ((labels < 0) | (labels >= V))
        if bool(bad.any()):
            val = int(labels[bad][0])
            raise ValueError(
                f"{labels_name} must hold token ids in [0, {V}) or ignore_index={ignore_index}, "
                f"got {val} ({int(bad.sum())} position(s) out of range)"
            )
        if not bool(mask.any()):
            raise ValueError(
                f"every position of {labels_name} equals ignore_index={ignore_index}: there is no token to "
                "transport to; check the label masking (with validate_args=False the loss is 0)"
            )
    rows, cols = mask.nonzero(as_tuple=True)
    targets = labels[rows, cols].long()
    counts = mask.sum(1)
    chunk = chunk_size if chunk_size is not None else max(1, _CHUNK_ELEMENTS // V)

    emb = embeddings if embedding_grad else embeddings.detach()
    table, label_table = _cost_table(emb, cost, mode, cdt)
    soft, tok_logp = _SoftEmbedding.apply(logits, table, rows, cols, targets, chunk)
    e_y = F.embedding(targets, label_table)  # [N, D]; raises on ids out of range even unvalidated

    if mode == "position":
        if cost == "cosine":
            pos = 1.0 - (soft * e_y).sum(-1)
        else:
            d = label_table.shape[1]
            m, second = soft[:, :d], soft[:, d]
            pos = (second - m.square().sum(-1)).clamp_min(0) + (m - e_y).square().sum(-1)
        per_seq = torch.zeros(B, dtype=cdt, device=logits.device).index_add(0, rows, pos)
        per_seq = per_seq / counts.clamp_min(1).to(cdt)
    else:
        if validate and not bool(torch.isfinite(soft).all()):  # name the logits before the solver sees NaN
            _diagnose(logits, embeddings, rows, cols, chunk, logits_name)
        per_seq = _sequence_ot(soft, e_y, rows, cols, counts, mask, cost, epsilon, solver_options, B, cdt)
    logps = torch.zeros(B, dtype=cdt, device=logits.device).index_add(0, rows, tok_logp)
    if validate and not bool(torch.isfinite(per_seq).all()):
        _diagnose(logits, embeddings, rows, cols, chunk, logits_name)
    return _TokenOT(per_seq, logps, counts)


def _sequence_ot(soft, e_y, rows, cols, counts, mask, cost, epsilon, solver_options, B, cdt) -> Tensor:
    """Entropic OT between each sequence's soft-embedding cloud and its label-embedding cloud."""
    if rows.numel() == 0:
        return soft.sum() * 0 + torch.zeros(B, dtype=cdt, device=soft.device)
    from otloss.entropic import entropic_ot

    L = int(counts.max())
    slot = (mask.cumsum(1) - 1)[rows, cols]  # rank of each counted position within its sequence
    D = soft.shape[1]
    x = soft.new_zeros((B, L, D)).index_put((rows, slot), soft)
    y = e_y.new_zeros((B, L, D)).index_put((rows, slot), e_y)
    empty = counts == 0
    n = torch.where(empty, L, counts).to(cdt)
    w = (torch.arange(L, device=soft.device)[None, :] < n[:, None]).to(cdt) / n[:, None]  # padding gets 0
    if cost == "cosine":
        C = 1.0 - F.normalize(x, dim=-1) @ F.normalize(y, dim=-1).transpose(1, 2)
    else:
        C = (x.square().sum(-1)[:, :, None] + y.square().sum(-1)[:, None, :] - 2 * x @ y.transpose(1, 2)).clamp_min(0)
    # the inputs are checked here (a NaN logit is named by token_ot_loss, not as a NaN cost)
    kwargs = {"validate_args": False} | (solver_options or {})
    value = entropic_ot(C, w, w, epsilon=epsilon, **kwargs)
    return torch.where(empty, torch.zeros_like(value), value)


def _reduce(per_seq: Tensor, counts: Tensor, reduction: str) -> Tensor:
    if reduction == "none":
        return per_seq
    if reduction == "sum":
        return per_seq.sum()
    nonempty = (counts > 0).sum().clamp_min(1).to(per_seq.dtype)
    return per_seq.sum() / nonempty


def token_ot_loss(
    logits: Tensor,
    labels: Tensor,
    embeddings: Tensor,
    *,
    mode: Mode = "sequence",
    cost: TokenCost = "cosine",
    epsilon: float = 0.05,
    ignore_index: int = -100,
    reduction: Reduction = "mean",
    embedding_grad: bool = False,
    chunk_size: int | None = None,
    solver_options: dict | None = None,
    validate_args: bool | None = None,
) -> Tensor:
    r"""Optimal transport between a model's predictions and its label tokens, in token-embedding space.

    With ``p_t = softmax(logits[b, t])`` and the cost between tokens ``C[i, j] = c(e_i, e_j)``
    (``e_i`` the rows of ``embeddings``):

    * ``mode="position"``: at each position, OT from ``p_t`` to the Dirac at the label ``y_t``,
      which is exact in closed form: ``sum_i p_t(i) C[i, y_t]``, the expected embedding cost of
      a token drawn from the model. Computed as ``1 - (p_t @ E_hat) . e_hat_y`` for the cosine
      cost (``E_hat`` the row-normalised embeddings) and as
      ``(p_t . |e|^2 - |m_t|^2) + |m_t - e_y|^2`` with ``m_t = p_t @ E`` for the squared
      Euclidean cost, so no ``[B, T, V, V]`` or ``[B, T, V, D]`` tensor is formed.
    * ``mode="sequence"`` (default): entropic OT between two point clouds with uniform weights
      over the non-ignored positions of each sequence: the expected ("soft") embeddings
      ``m_t = sum_i p_t(i) e_i`` and the label embeddings ``e_{y_t}``. The transport is free
      to match a prediction to any label of the sequence (a "global token-level" loss, Chen
      et al. 2019, "Improving Sequence-to-Sequence Learning via Optimal Transport", arXiv
      1901.06283). The value is ``<P_eps, C>`` from :func:`otloss.entropic_ot`, ``C`` the
      ``[L, L]`` cost between the two clouds (``1 - cos(m_s, e_{y_t})`` or
      ``|m_s - e_{y_t}|^2``).

    Args:
        logits: ``[batch, seq_len, vocab]`` scores of the next token, any floating dtype.
        labels: ``[batch, seq_len]`` integer token ids; ``labels[b, t]`` is the target of
            ``logits[b, t]`` (already shifted, as for ``F.cross_entropy``).
        embeddings: ``[vocab, dim]`` token embeddings defining the cost (the model's input or
            output embedding matrix). Any floating dtype; computed in the dtype of the logits'
            computation (float32, or float64 for float64 logits).
        mode: ``"sequence"`` (default) or ``"position"``, see above.
        cost: ``"cosine"`` (default; ``1 - cos``, in ``[0, 2]``, ``1`` for unrelated
            directions; a zero vector has cosine 0 with everything) or ``"sqeuclidean"``
            (``|e_i - e_j|^2``, in the units of the embeddings squared).
        epsilon: entropic regularisation of ``mode="sequence"``, in the units of the cost
            (0.05 is 2.5% of the cosine cost's range); ``0`` asks :func:`otloss.entropic_ot`
            for the exact LP. Ignored by ``mode="position"``, which is exact.
        ignore_index: label value of positions that do not count (prompt, padding).
        reduction: ``"mean"`` (default): the mean over the sequences that have at least one
            counted position; ``"none"``: ``[batch]``, one value per sequence, the mean over its
            counted positions (position mode) or its OT value (sequence mode), ``0`` for a
            sequence without counted positions; ``"sum"``: the sum of those.
        embedding_grad: ``False`` (default) treats the embeddings as a fixed geometry
            (detached); ``True`` lets gradients flow into them.
        chunk_size: positions per chunk of the pass over the vocabulary; ``None`` picks
            ``max(1, 2**24 // vocab)`` (about 64 MiB per float32 ``[chunk, vocab]`` buffer).
            The value does not depend on it.
        solver_options: keyword arguments of :func:`otloss.entropic_ot` for ``mode="sequence"``,
            e.g. ``{"max_iter": 5000, "tol": 1e-8}`` or ``{"grad": "implicit"}`` (the exact
            derivative of ``<P_eps, C>`` instead of the default envelope gradient ``P_eps``).
            ``None`` keeps its defaults, except ``validate_args``, which is ``False`` there
            because this function checks its own inputs.
        validate_args: check values (a host synchronisation on GPU): labels in ``[0, vocab)``
            or ``ignore_index`` and at least one counted position in the batch; and, only when
            the result is not finite, which input made it so (NaN/Inf embeddings; NaN, +Inf or
            all -Inf rows of logits at counted positions), so finite inputs pay no extra pass.
            ``None`` uses :func:`otloss.get_validate_args`. Unvalidated, NaN inputs give a NaN
            loss, a label out of range raises from the indexing (``RuntimeError``/``IndexError``
            on the CPU, a device-side assert on CUDA), and a batch without counted positions
            gives 0.

    Returns:
        The loss in the dtype of ``logits`` (computed in float32, float64 for float64 logits):
        a scalar, or ``[batch]`` for ``reduction="none"``. Differentiable w.r.t. ``logits``
        (and ``embeddings`` with ``embedding_grad=True``); first derivatives only (a second
        derivative raises ``RuntimeError``), and not under ``torch.func`` transforms (``vmap``,
        ``grad``: ``RuntimeError``), because the chunked pass is a custom autograd node.

    Raises:
        TypeError: an argument of the wrong type or dtype.
        ValueError: shapes that do not match (vocab of ``logits`` vs rows of ``embeddings``,
            ``labels`` vs ``logits``), devices that differ, bad options, and the value checks
            above.
    """
    _check_logits(logits, "logits")
    _check_labels(labels, logits, "labels", "logits")
    _check_embeddings(embeddings, logits.shape[-1], logits.device, "logits")
    chunk_size = _check_options(
        mode, cost, epsilon, ignore_index, reduction, chunk_size, embedding_grad, solver_options
    )
    validate = resolve_validate(validate_args)
    out = _token_ot(
        logits,
        labels,
        embeddings,
        mode=mode,
        cost=cost,
        epsilon=float(epsilon),
        ignore_index=ignore_index,
        embedding_grad=embedding_grad,
        chunk_size=chunk_size,
        solver_options=solver_options,
        validate=validate,
        logits_name="logits",
        labels_name="labels",
    )
    return _reduce(out.per_seq, out.counts, reduction).to(logits.dtype)


# --------------------------------------------------------------------------------------------
# The preference loss
# --------------------------------------------------------------------------------------------


class PLOTOutput(NamedTuple):
    """What :func:`plot_loss` returns with ``return_components=True`` (the parts are detached).

    Attributes:
        loss: ``base_loss + alpha * plot_term``, differentiable.
        base_loss: the base loss (0 when ``base=None``).
        plot_term: ``L_PLOT`` before the factor ``alpha``.
        chosen_ot: the mean token-OT cost of the chosen responses.
        rejected_ot: the mean token-OT cost of the rejected responses.
    """

    loss: Tensor
    base_loss: Tensor
    plot_term: Tensor
    chosen_ot: Tensor
    rejected_ot: Tensor


def _check_logps(x: object, name: str, batch: int, device: torch.device) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must have a floating-point dtype, got {x.dtype}")
    if tuple(x.shape) != (batch,):
        raise ValueError(
            f"{name} must have shape [{batch}] (one summed log-probability per response), got {tuple(x.shape)}"
        )
    if x.device != device:
        raise ValueError(f"{name} must be on the device of the logits ({device}), got {x.device}")
    return x


def _check_plot_options(
    base: object,
    push: object,
    alpha: object,
    beta: object,
    gamma: object,
    margin: object,
    cost: object,
    return_components: object,
    aot_kwargs: object,
) -> tuple[float, float | None, float, float]:
    """The options of :func:`plot_loss` that are not :func:`token_ot_loss`'s; ``(alpha, beta, gamma, margin)``."""
    if base not in _BASES:
        raise ValueError(f"base must be one of {list(_BASES)}, got {base!r}")
    if push not in _PUSHES:
        raise ValueError(f"push must be one of {list(_PUSHES)}, got {push!r}")
    alpha = _check_number(alpha, "alpha")
    beta = None if beta is None else _check_number(beta, "beta", positive=True)
    gamma = _check_number(gamma, "gamma", positive=True)
    if margin is None:
        if cost != "cosine" and push == "hinge":
            raise ValueError(
                f"margin must be given with cost={cost!r} (its units are those of the embeddings squared); "
                "the default margin=1.0 applies to the cosine cost"
            )
        margin = 1.0
    margin = _check_number(margin, "margin", positive=True)
    if not isinstance(return_components, bool):
        raise TypeError(f"return_components must be a bool, got {type(return_components).__name__}")
    if aot_kwargs is not None and not isinstance(aot_kwargs, dict):
        raise TypeError(f"aot_kwargs must be a dict or None, got {type(aot_kwargs).__name__}")
    if aot_kwargs and base != "aot":
        raise ValueError(f"aot_kwargs applies to base='aot' only, got base={base!r}")
    if aot_kwargs and beta is not None and "beta" in aot_kwargs:
        raise ValueError("beta is given twice: as plot_loss(beta=...) and in aot_kwargs; pass one")
    return alpha, beta, gamma, margin


def plot_loss(
    chosen_logits: Tensor,
    chosen_labels: Tensor,
    rejected_logits: Tensor,
    rejected_labels: Tensor,
    embeddings: Tensor,
    *,
    ref_chosen_logps: Tensor | None = None,
    ref_rejected_logps: Tensor | None = None,
    policy_chosen_logps: Tensor | None = None,
    policy_rejected_logps: Tensor | None = None,
    base: Base = "dpo",
    alpha: float = 1.0,
    beta: float | None = None,
    push: Push = "hinge",
    margin: float | None = None,
    gamma: float = 10.0,
    mode: Mode = "sequence",
    cost: TokenCost = "cosine",
    epsilon: float = 0.05,
    ignore_index: int = -100,
    embedding_grad: bool = False,
    chunk_size: int | None = None,
    solver_options: dict | None = None,
    aot_kwargs: dict | None = None,
    validate_args: bool | None = None,
    return_components: bool = False,
) -> Tensor | PLOTOutput:
    r"""The PLOT preference loss (one reading of arXiv 2604.01837): ``L = L_base + alpha * L_PLOT``.

    ``OT_c[b]`` and ``OT_r[b]`` are :func:`token_ot_loss` (``reduction="none"``) of the chosen
    and rejected responses. The token-level term pulls chosen responses toward their tokens and
    pushes rejected ones away, with a push that is bounded so that it cannot diverge:

    * ``push="hinge"`` (default): ``L_PLOT = mean_b OT_c[b] + mean_b' max(0, margin - OT_r[b'])``.
      The pull is always on; the push stops once a rejected response is ``margin`` away from its
      tokens. With the cosine cost ``margin = 1`` (the default) is the cost of a prediction
      orthogonal, on average, to the rejected tokens: pushing further would only move mass
      toward tokens of opposite meaning. Chosen and rejected need not be paired.
    * ``push="logistic"``: ``L_PLOT = mean_b -logsigmoid(gamma * (OT_r[b] - OT_c[b]))``, the
      Bradley-Terry form of DPO with ``-OT`` as the reward of a response; bounded below by 0,
      and both forces fade as the gap grows. Needs paired batches.

    The base loss, from summed response log-probabilities (``policy_*_logps`` when given, else
    computed from the logits and labels in the same pass over the vocabulary):

    * ``"dpo"``: ``mean_b -logsigmoid(beta * ((pc - rc) - (pr - rr)))``, ``beta = 0.1`` by default.
    * ``"aot"``: :func:`otloss.aot_loss` (``beta = 0.01`` by default, other options through
      ``aot_kwargs``, e.g. ``{"paired": False}`` for unpaired batches).
    * ``"sft"``: the negative log-likelihood of the chosen tokens, averaged over tokens.
    * ``None``: no base loss; ``L = alpha * L_PLOT``. Adapters whose trainer computes its own
      loss add this to it.

    Args:
        chosen_logits: ``[B, T, V]`` policy logits on the chosen responses.
        chosen_labels: ``[B, T]`` their shifted labels (``ignore_index`` on prompt and padding).
        rejected_logits: ``[B', T', V]`` policy logits on the rejected responses.
        rejected_labels: ``[B', T']`` their labels.
        embeddings: ``[V, D]`` token embeddings defining the cost (detached unless
            ``embedding_grad=True``).
        ref_chosen_logps: ``[B]`` reference log-probabilities of the chosen responses (``"dpo"``, ``"aot"``).
        ref_rejected_logps: ``[B']`` likewise for the rejected ones.
        policy_chosen_logps: ``[B]`` optional policy log-probabilities (summed over tokens); ``None``
            computes them from ``chosen_logits`` and ``chosen_labels``.
        policy_rejected_logps: ``[B']`` likewise.
        base: ``"dpo"`` (default), ``"aot"``, ``"sft"`` or ``None``.
        alpha: weight of ``L_PLOT``, ``>= 0``; 1.0 by default (the abstract gives no value).
        beta: the base loss's ``beta``; ``None`` is 0.1 for DPO and AOT's default (0.01) for AOT.
        push: ``"hinge"`` (default) or ``"logistic"``, see above.
        margin: the hinge margin in the units of the cost; ``None`` means 1.0 with the cosine
            cost and must be given with ``"sqeuclidean"``.
        gamma: the logistic push's scale (per unit of cost), 10 by default.
        mode: as in :func:`token_ot_loss`.
        cost: as in :func:`token_ot_loss`.
        epsilon: as in :func:`token_ot_loss`.
        ignore_index: as in :func:`token_ot_loss`.
        embedding_grad: as in :func:`token_ot_loss`.
        chunk_size: as in :func:`token_ot_loss`.
        solver_options: as in :func:`token_ot_loss`.
        aot_kwargs: extra keyword arguments of :func:`otloss.aot_loss` for ``base="aot"``.
        validate_args: as in :func:`token_ot_loss`, also for the base loss.
        return_components: also return the parts, as a :class:`PLOTOutput`.

    Returns:
        The scalar loss in the dtype of ``chosen_logits``, or a :class:`PLOTOutput`.
    """
    _check_logits(chosen_logits, "chosen_logits")
    _check_logits(rejected_logits, "rejected_logits")
    V = chosen_logits.shape[-1]
    if rejected_logits.shape[-1] != V:
        raise ValueError(
            f"chosen_logits and rejected_logits must have the same vocab size, got {V} and {rejected_logits.shape[-1]}"
        )
    if rejected_logits.device != chosen_logits.device:
        raise ValueError(
            f"chosen_logits and rejected_logits must be on the same device, got {chosen_logits.device} and "
            f"{rejected_logits.device}"
        )
    _check_labels(chosen_labels, chosen_logits, "chosen_labels", "chosen_logits")
    _check_labels(rejected_labels, rejected_logits, "rejected_labels", "rejected_logits")
    _check_embeddings(embeddings, V, chosen_logits.device, "chosen_logits")
    chunk_size = _check_options(mode, cost, epsilon, ignore_index, "mean", chunk_size, embedding_grad, solver_options)
    alpha, beta, gamma, margin = _check_plot_options(
        base, push, alpha, beta, gamma, margin, cost, return_components, aot_kwargs
    )
    Bc, Br = chosen_logits.shape[0], rejected_logits.shape[0]
    paired = base == "dpo" or push == "logistic" or (base == "aot" and (aot_kwargs or {}).get("paired", True))
    if paired and Bc != Br:
        raise ValueError(
            f"chosen and rejected batches must have the same size for base={base!r}, push={push!r} "
            f"(got {Bc} and {Br}); use push='hinge' with base='sft', None, or 'aot' with aot_kwargs={{'paired': False}}"
        )
    dev = chosen_logits.device
    needs_ref = base in ("dpo", "aot")
    if needs_ref:
        if ref_chosen_logps is None or ref_rejected_logps is None:
            raise ValueError(f"base={base!r} needs ref_chosen_logps and ref_rejected_logps (the reference model's)")
        _check_logps(ref_chosen_logps, "ref_chosen_logps", Bc, dev)
        _check_logps(ref_rejected_logps, "ref_rejected_logps", Br, dev)
    if policy_chosen_logps is not None:
        _check_logps(policy_chosen_logps, "policy_chosen_logps", Bc, dev)
    if policy_rejected_logps is not None:
        _check_logps(policy_rejected_logps, "policy_rejected_logps", Br, dev)
    validate = resolve_validate(validate_args)

    common = dict(
        mode=mode,
        cost=cost,
        epsilon=float(epsilon),
        ignore_index=ignore_index,
        embedding_grad=embedding_grad,
        chunk_size=chunk_size,
        solver_options=solver_options,
        validate=validate,
    )
    ch = _token_ot(
        chosen_logits, chosen_labels, embeddings, logits_name="chosen_logits", labels_name="chosen_labels", **common
    )
    rj = _token_ot(
        rejected_logits,
        rejected_labels,
        embeddings,
        logits_name="rejected_logits",
        labels_name="rejected_labels",
        **common,
    )
    cdt = ch.per_seq.dtype
    chosen_ot = _reduce(ch.per_seq, ch.counts, "mean")
    rejected_ot = _reduce(rj.per_seq, rj.counts, "mean")
    if push == "hinge":
        push_term = _reduce((margin - rj.per_seq).clamp_min(0) * (rj.counts > 0), rj.counts, "mean")
        plot_term = chosen_ot + push_term
    else:
        both = (ch.counts > 0) & (rj.counts > 0)
        pair = -F.logsigmoid(gamma * (rj.per_seq - ch.per_seq)) * both
        plot_term = pair.sum() / both.sum().clamp_min(1).to(cdt)

    if base is None:
        base_loss = torch.zeros((), dtype=cdt, device=dev)
    elif base == "sft":
        base_loss = -ch.logps.sum() / ch.counts.sum().clamp_min(1).to(cdt)
    else:
        pc = ch.logps if policy_chosen_logps is None else policy_chosen_logps.to(cdt)
        pr = rj.logps if policy_rejected_logps is None else policy_rejected_logps.to(cdt)
        rc, rr = ref_chosen_logps.to(cdt), ref_rejected_logps.to(cdt)
        if validate:
            for t, name in ((rc, "ref_chosen_logps"), (rr, "ref_rejected_logps"), (pc, "policy_chosen_logps"),
                            (pr, "policy_rejected_logps")):  # fmt: skip
                check_finite(t, name)
        if base == "dpo":
            b = 0.1 if beta is None else beta
            base_loss = -F.logsigmoid(b * ((pc - rc) - (pr - rr))).mean()
        else:
            from otloss.functional import aot_loss

            kw = dict(aot_kwargs or {})
            if beta is not None:
                kw["beta"] = beta
            kw.setdefault("validate_args", validate)
            base_loss = aot_loss(pc, pr, rc, rr, **kw).to(cdt)
    loss = (base_loss + alpha * plot_term).to(chosen_logits.dtype)
    if not return_components:
        return loss
    return PLOTOutput(loss, base_loss.detach(), plot_term.detach(), chosen_ot.detach(), rejected_ot.detach())


# --------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------


class TokenOTLoss(nn.Module):
    """:func:`token_ot_loss` as a module; the options are stored, the tensors go to ``forward``.

    Example:
        >>> loss_fn = TokenOTLoss(mode="position")
        >>> loss = loss_fn(logits, labels, model.get_input_embeddings().weight)
    """

    def __init__(
        self,
        *,
        mode: Mode = "sequence",
        cost: TokenCost = "cosine",
        epsilon: float = 0.05,
        ignore_index: int = -100,
        reduction: Reduction = "mean",
        embedding_grad: bool = False,
        chunk_size: int | None = None,
        solver_options: dict | None = None,
        validate_args: bool | None = None,
    ) -> None:
        super().__init__()
        _check_options(mode, cost, epsilon, ignore_index, reduction, chunk_size, embedding_grad, solver_options)
        self.mode = mode
        self.cost = cost
        self.epsilon = epsilon
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.embedding_grad = embedding_grad
        self.chunk_size = chunk_size
        self.solver_options = solver_options
        self.validate_args = validate_args

    def forward(self, logits: Tensor, labels: Tensor, embeddings: Tensor) -> Tensor:
        return token_ot_loss(
            logits,
            labels,
            embeddings,
            mode=self.mode,
            cost=self.cost,
            epsilon=self.epsilon,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            embedding_grad=self.embedding_grad,
            chunk_size=self.chunk_size,
            solver_options=self.solver_options,
            validate_args=self.validate_args,
        )

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, cost={self.cost!r}, epsilon={self.epsilon}, reduction={self.reduction!r}"


class PLOTLoss(nn.Module):
    """:func:`plot_loss` as a module; the options are stored, the tensors go to ``forward``.

    Example:
        >>> loss_fn = PLOTLoss(base="dpo", alpha=1.0)
        >>> loss = loss_fn(chosen_logits, chosen_labels, rejected_logits, rejected_labels, embeddings,
        ...                ref_chosen_logps=rc, ref_rejected_logps=rr)
    """

    def __init__(
        self,
        *,
        base: Base = "dpo",
        alpha: float = 1.0,
        beta: float | None = None,
        push: Push = "hinge",
        margin: float | None = None,
        gamma: float = 10.0,
        mode: Mode = "sequence",
        cost: TokenCost = "cosine",
        epsilon: float = 0.05,
        ignore_index: int = -100,
        embedding_grad: bool = False,
        chunk_size: int | None = None,
        solver_options: dict | None = None,
        aot_kwargs: dict | None = None,
        validate_args: bool | None = None,
        return_components: bool = False,
    ) -> None:
        super().__init__()
        _check_options(mode, cost, epsilon, ignore_index, "mean", chunk_size, embedding_grad, solver_options)
        _check_plot_options(base, push, alpha, beta, gamma, margin, cost, return_components, aot_kwargs)
        self.options = dict(
            base=base,
            alpha=alpha,
            beta=beta,
            push=push,
            margin=margin,
            gamma=gamma,
            mode=mode,
            cost=cost,
            epsilon=epsilon,
            ignore_index=ignore_index,
            embedding_grad=embedding_grad,
            chunk_size=chunk_size,
            solver_options=solver_options,
            aot_kwargs=aot_kwargs,
            validate_args=validate_args,
            return_components=return_components,
        )

    def forward(
        self,
        chosen_logits: Tensor,
        chosen_labels: Tensor,
        rejected_logits: Tensor,
        rejected_labels: Tensor,
        embeddings: Tensor,
        ref_chosen_logps: Tensor | None = None,
        ref_rejected_logps: Tensor | None = None,
        policy_chosen_logps: Tensor | None = None,
        policy_rejected_logps: Tensor | None = None,
    ) -> Tensor | PLOTOutput:
        return plot_loss(
            chosen_logits,
            chosen_labels,
            rejected_logits,
            rejected_labels,
            embeddings,
            ref_chosen_logps=ref_chosen_logps,
            ref_rejected_logps=ref_rejected_logps,
            policy_chosen_logps=policy_chosen_logps,
            policy_rejected_logps=policy_rejected_logps,
            **self.options,
        )

    def extra_repr(self) -> str:
        o = self.options
        return f"base={o['base']!r}, alpha={o['alpha']}, push={o['push']!r}, mode={o['mode']!r}, cost={o['cost']!r}"

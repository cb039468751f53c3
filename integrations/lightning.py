"""PyTorch Lightning adapter: AOT preference alignment of a Hugging Face causal LM.

Needs the ``lightning`` extra: ``pip install "torch-otloss[lightning]"`` (or
``pip install -e ".[lightning]"`` from a checkout); importing this module without
Lightning raises an ``ImportError`` that says so.

* :class:`AOTAlignmentModule`: a ``LightningModule`` that computes sequence
  log-probabilities of chosen/rejected completions under the policy and the
  reference and applies :class:`otloss.AOTLoss`.
* :class:`AOTDataModule`: a ``LightningDataModule`` over in-memory examples,
  collated by :class:`PairedCollator` or :class:`UnpairedCollator`.
* :class:`QuantilePlotCallback`: at the end of each validation, plots reward and
  margin quantiles to a PNG and to the logger when it takes images.

Example:
    >>> from otloss.integrations.lightning import AOTAlignmentModule, AOTDataModule
    >>> module = AOTAlignmentModule(peft_model, beta=0.01, lr=1e-4)
    >>> data = AOTDataModule(tokenizer, train_examples, val_examples, batch_size=8)
    >>> lightning.Trainer(max_epochs=1, strategy="ddp").fit(module, datamodule=data)
"""

from __future__ import annotations

import importlib.util
import math
import random
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from otloss.integrations._common import install_hint

try:
    import lightning.pytorch as pl
except ImportError as exc:  # pragma: no cover - exercised by a test that hides lightning
    raise ImportError(
        "otloss.integrations.lightning needs PyTorch Lightning, transformers, peft and matplotlib: "
        + install_hint("lightning")
    ) from exc

import torch
from otloss.integrations._common import (
    DEFAULT_BETA,
    aot_uv,
    build_plot,
    gather_logps,
    has_both_classes,
    input_embeddings,
    loss_module,
    plot_term,
    preference_metrics,
    split_logps,
)
from otloss.integrations._hf import (
    PairedCollator,
    UnpairedCollator,
    check_transformers_peft,
    disable_adapters,
    is_peft_model,
    sequence_logps,
    unwrap_model,
)
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, DistributedSampler

from otloss.costs import Cost
from otloss.diagnostics import DEFAULT_QUANTILES, quantile_function
from otloss.distributed import QuantileMemory
from otloss.functional import CostArg, SortArg

__all__ = [
    "AOTAlignmentModule",
    "AOTDataModule",
    "PairedCollator",
    "QuantilePlotCallback",
    "UnpairedCollator",
    "sequence_logps",
]

_LOGP_KEYS = ("policy_chosen", "policy_rejected", "ref_chosen", "ref_rejected")
_PLOT_KEYS = ("plot/term", "plot/chosen_ot", "plot/rejected_ot")
_SIDES = ("chosen", "rejected")
_PAIRED_KEYS = tuple(f"{side}_{k}" for side in _SIDES for k in ("input_ids", "attention_mask", "loss_mask"))
_UNPAIRED_KEYS = ("input_ids", "attention_mask", "loss_mask", "label")
_HPARAMS = ("paired", "cost", "beta", "label_smoothing", "sort", "backend", "global_batch", "accumulate_quantiles")
_HPARAMS += ("logps_reduction", "optimizer")  # and lr, weight_decay, reference, the plot_* options


class AOTAlignmentModule(pl.LightningModule):
    """Align a causal LM with AOT (Alignment via Optimal Transport).

    Each step computes the sequence log-probabilities (prompt tokens masked out,
    see :func:`otloss.integrations._hf.sequence_logps`) of the batch's completions
    under the policy and the reference, then :class:`otloss.AOTLoss`:

    * ``paired=True``: batches from :class:`PairedCollator`; the policy margins
      ``logp(chosen) - logp(rejected)`` are pushed to dominate the reference margins.
    * ``paired=False``: batches from :class:`UnpairedCollator` with ``n`` desirable
      and ``m`` undesirable samples (``n != m`` allowed); the desirable log-ratios
      ``logp_policy - logp_ref`` are pushed to dominate the undesirable ones.

    Reference model: with ``ref_model=None`` and a PEFT policy (``peft.PeftModel`` or
    a ``transformers`` model with adapters added), the same model with its adapters
    disabled (module flags only: no second copy, and it holds under FSDP). A given
    ``ref_model`` is frozen here (``requires_grad_(False)``, always in eval mode); it
    is a submodule, so strategies move and shard it and checkpoints include it.

    The loss module ``self.loss_fn``, one :class:`otloss.AOTLoss` built once
    (``global_batch=True`` is its ``"auto"``), follows the module's train/eval mode
    (the quantile memory of ``accumulate_quantiles`` serves training only).

    Logged (``train/`` per step on each rank's batch, ``val/`` per epoch over the
    validation set of all ranks): ``loss``; ``rewards/chosen``, ``rewards/rejected``
    (TRL's implicit rewards ``beta * (logp_policy - logp_ref)``, with ``beta`` the
    loss's: the ``beta`` given, or that of a built-in ``otloss.Cost`` passed as ``cost``,
    0.01 otherwise), ``rewards/margins``, ``rewards/accuracies`` (paired:
    fraction of pairs ranked correctly; unpaired: of all (desirable, undesirable)
    pairs), ``logps/chosen``, ``logps/rejected``; the FSD diagnostics of
    :func:`otloss.fsd_report` of the loss's ``u`` over ``v`` in log-ratio units
    (``fsd_area``, ``fsd_w1``, ``fsd_w2``, ``quantile_margin_<t>``);
    ``skipped_batches`` for unpaired batches lacking a class.

    PLOT (``plot_alpha > 0``): the loss becomes ``AOT + plot_alpha * L_PLOT``, with
    ``L_PLOT`` the core's :func:`otloss.plot_loss` term (``base=None``) on the policy's
    logits of the step's forward (no copy of them is made) and the model's input
    embedding matrix, on the local batch when it holds a chosen and a rejected
    response, in training and validation; logged as ``plot/term``, ``plot/chosen_ot``
    and ``plot/rejected_ot``.

    Unpaired batch with no desirable or no undesirable sample: the AOT loss is
    undefined. In a single process ``training_step`` returns ``None`` before any
    forward pass, so Lightning skips the optimizer step (no update). With several
    processes it returns a zero loss attached to the graph, so that the gradient
    all-reduce stays in step; that rank then adds zero to the averaged gradient.

    Args:
        model: the policy, a Hugging Face causal LM (PEFT-wrapped or not) with
            trainable parameters.
        ref_model: an explicit reference model, or ``None`` (see above).
        paired: paired (Algorithm 2) or unpaired (Algorithm 1) AOT.
        cost: ``"logistic"``, ``"hinge"``, ``"squared_hinge"``, ``"least_squares"``,
            or an :class:`otloss.Cost` / callable; see :func:`otloss.aot_loss`.
        beta: for a cost given by name; ``None`` means 0.01 (the paper's value).
        label_smoothing: logistic cost only.
        sort: ``"hard"``, ``"soft"`` or an :class:`otloss.SoftSort`.
        backend: ``"auto"``, ``"torch"`` or ``"triton"`` (the fused kernels, CUDA
            only), as in :func:`otloss.aot_loss`.
        global_batch: with several processes, all-gather the margins (paired) or
            log-ratios (unpaired) of every rank and sort the global batch (see
            :mod:`otloss.distributed`: the gradient is that of the single-process
            loss on the concatenated batch). In a single process it changes
            nothing. Unpaired: a step is skipped on every rank only when the
            *global* batch lacks a class. ``False``: each rank sorts its own batch.
        accumulate_quantiles: with ``Trainer(accumulate_grad_batches > 1)``, sort
            each training micro-batch together with the earlier micro-batches of the
            same optimizer step (:class:`otloss.QuantileMemory`, reset after every
            optimizer step and at the start of each epoch). Validation never uses it.
        logps_reduction: ``"sum"`` (sequence log-probability) or ``"mean"``
            (per completion token).
        optimizer: ``"adamw"`` (``torch.optim.AdamW``) or a callable taking the
            trainable parameters and returning an optimizer.
        lr: AdamW's learning rate (ignored by a callable ``optimizer``).
        weight_decay: AdamW's weight decay (ignored by a callable ``optimizer``).
        optimizer_kwargs: further AdamW keyword arguments (ignored by a callable ``optimizer``).
        lr_scheduler: ``None`` or a callable taking the optimizer and returning a
            scheduler (stepped every optimizer step) or a Lightning
            ``lr_scheduler`` config dict.
        log_fsd: log the FSD diagnostics (a host sync per step on GPU).
        fsd_quantiles: levels of the logged ``quantile_margin_<t>``.
        validate_args: passed to :class:`otloss.AOTLoss` (NaN/Inf checks).
        fsdp2_modules: under Lightning's ``ModelParallelStrategy`` (FSDP2),
            :meth:`configure_model` applies ``fully_shard`` to every submodule whose
            class (or class name) is listed, then to the policy (and the reference
            model). ``None`` uses the model's ``_no_split_modules`` (the decoder
            layer class of every ``transformers`` LM). Ignored by other strategies.
        fsdp2_kwargs: extra keyword arguments for ``fully_shard`` (e.g. ``mp_policy``).
        plot_alpha: weight of the PLOT term, as in the TRL adapter's ``PLOTOptions``;
            ``0`` (default) turns PLOT off: the loss, the metrics and the work are exactly AOT's.
        plot_mode: as in the TRL adapter's ``PLOTOptions`` (same default).
        plot_cost: as in the TRL adapter's ``PLOTOptions`` (same default).
        plot_epsilon: as in the TRL adapter's ``PLOTOptions`` (same default).
        plot_margin: as in the TRL adapter's ``PLOTOptions`` (same default).
        plot_embedding_grad: as in the TRL adapter's ``PLOTOptions`` (same default).

    Raises:
        ValueError / TypeError: incompatible options, at construction.
        ImportError: a reference taken through transformers' PEFT integration
            (``model.add_adapter``) with transformers >= 5.24 and peft < 0.22.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        ref_model: nn.Module | None = None,
        paired: bool = True,
        cost: CostArg = "logistic",
        beta: float | None = None,
        label_smoothing: float = 0.0,
        sort: SortArg = "hard",
        backend: Literal["auto", "torch", "triton"] = "auto",
        global_batch: bool = False,
        accumulate_quantiles: bool = False,
        logps_reduction: Literal["sum", "mean"] = "sum",
        optimizer: Literal["adamw"] | Callable[[list[nn.Parameter]], torch.optim.Optimizer] = "adamw",
        lr: float = 1e-5,
        weight_decay: float = 0.0,
        optimizer_kwargs: Mapping[str, Any] | None = None,
        lr_scheduler: Callable[[torch.optim.Optimizer], Any] | None = None,
        log_fsd: bool = True,
        fsd_quantiles: Sequence[float] = DEFAULT_QUANTILES,
        validate_args: bool | None = None,
        fsdp2_modules: Sequence[str | type[nn.Module]] | None = None,
        fsdp2_kwargs: Mapping[str, Any] | None = None,
        plot_alpha: float = 0.0,
        plot_mode: Literal["sequence", "position"] = "sequence",
        plot_cost: Literal["cosine", "sqeuclidean"] = "cosine",
        plot_epsilon: float = 0.05,
        plot_margin: float | None = None,
        plot_embedding_grad: bool = False,
    ) -> None:
        init_args = dict(locals())
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module (a causal LM), got {type(model).__name__}")
        if logps_reduction not in ("sum", "mean"):
            raise ValueError(f"logps_reduction must be 'sum' or 'mean', got {logps_reduction!r}")
        if ref_model is not None:
            if not isinstance(ref_model, nn.Module):
                raise TypeError(f"ref_model must be a torch.nn.Module or None, got {type(ref_model).__name__}")
            if ref_model is model:
                raise ValueError(
                    "ref_model is the policy itself: pass ref_model=None with a PEFT policy (the reference is "
                    "then the model with adapters disabled) or a separate copy, e.g. copy.deepcopy(model)"
                )
        elif not is_peft_model(model):
            raise ValueError(
                f"{type(model).__name__} is not a PEFT model, so the reference cannot be taken by disabling "
                "adapters: wrap it with LoRA (peft.get_peft_model(model, LoraConfig(...))) or pass "
                "ref_model=copy.deepcopy(model) before training"
            )
        elif getattr(unwrap_model(model), "_hf_peft_config_loaded", False):
            check_transformers_peft()  # adapters added with model.add_adapter: disabled through transformers
        if not any(p.requires_grad for p in model.parameters()):
            raise ValueError("model has no trainable parameter (every requires_grad is False)")
        if optimizer != "adamw" and not callable(optimizer):
            raise ValueError(f"optimizer must be 'adamw' or a callable params -> Optimizer, got {optimizer!r}")
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (math.isfinite(lr) and lr > 0):
            raise ValueError(f"lr must be a finite positive number, got {lr!r}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        if lr_scheduler is not None and not callable(lr_scheduler):
            raise TypeError("lr_scheduler must be None or a callable optimizer -> scheduler (or config dict)")
        fsd_quantiles = tuple(float(q) for q in fsd_quantiles)
        if not fsd_quantiles or any(not 0 <= q <= 1 for q in fsd_quantiles):
            raise ValueError(f"fsd_quantiles must be a non-empty sequence of levels in [0, 1], got {fsd_quantiles}")

        self.model = model
        self.ref_model = ref_model
        if ref_model is not None:
            ref_model.requires_grad_(False)
            ref_model.eval()
        # Built once; validates cost / beta / label_smoothing / sort / backend / global_batch now.
        self.loss_fn = loss_module(
            paired=paired,
            cost=cost,
            beta=beta,
            label_smoothing=label_smoothing,
            sort=sort,
            validate_args=validate_args,
            backend=backend,
            global_batch=global_batch,
            accumulate_quantiles=accumulate_quantiles,
        )
        self.plot = build_plot(plot_alpha, plot_mode, plot_cost, plot_epsilon, plot_margin, plot_embedding_grad)
        self.paired = paired
        # the rewards' factor is the loss's beta: given, or carried by a built-in Cost object, else 0.01
        cost_beta = getattr(cost, "beta", None) if isinstance(cost, Cost) else None
        self.reward_beta = float(beta) if beta is not None else DEFAULT_BETA if cost_beta is None else float(cost_beta)
        self.logps_reduction = logps_reduction
        self._optimizer = optimizer
        self._optimizer_kwargs = dict(optimizer_kwargs or {})
        self._lr_scheduler = lr_scheduler
        self.log_fsd = log_fsd
        self.fsd_quantiles = fsd_quantiles
        self._fsdp2_modules = None if fsdp2_modules is None else tuple(fsdp2_modules)
        self._fsdp2_kwargs = dict(fsdp2_kwargs or {})
        self._fsdp2_applied = False
        hparams = {k: v for k, v in init_args.items() if k in _HPARAMS or k.startswith("plot_")}
        hparams.update(lr=float(lr), weight_decay=float(weight_decay))
        hparams["reference"] = "disabled_adapters" if ref_model is None else "ref_model"
        self.save_hyperparameters(
            {k: v if isinstance(v, (str, bool, int, float, type(None))) else repr(v) for k, v in hparams.items()}
        )
        self._val_logps: list[tuple[Tensor, ...]] = []
        self._val_gathered: tuple[Tensor, ...] | None = None

    @property
    def _memory(self) -> QuantileMemory | None:
        return self.loss_fn.memory

    # ------------------------------------------------------------------ modes

    def train(self, mode: bool = True) -> AOTAlignmentModule:
        """Set train/eval mode; an explicit reference model always stays in eval mode."""
        super().train(mode)
        if self.ref_model is not None:
            self.ref_model.eval()
        return self

    # ------------------------------------------------------------------ sharding

    def _shard_targets(self, model: nn.Module) -> tuple[str | type[nn.Module], ...]:
        if self._fsdp2_modules is not None:
            return self._fsdp2_modules
        names = {name for sub in model.modules() for name in (getattr(sub, "_no_split_modules", None) or ())}
        if not names:
            raise ValueError(
                f"{type(model).__name__} declares no _no_split_modules: pass fsdp2_modules=[<decoder layer class>] "
                "to AOTAlignmentModule to shard it with ModelParallelStrategy"
            )
        return tuple(sorted(names))

    def configure_model(self) -> None:
        """Shard with FSDP2 (``fully_shard``) when the strategy provides a device mesh.

        Only Lightning's ``ModelParallelStrategy`` sets the mesh; under every other
        strategy this does nothing. The data-parallel dimension of the mesh is used.
        Each matching layer is sharded on its own, then the policy root (and the
        reference model the same way). PEFT adapters stay ordinary submodules of
        the sharded layers, so disabling them for the reference still only flips flags.
        """
        mesh = self._device_mesh
        if mesh is None or self._fsdp2_applied:
            return
        from torch.distributed.fsdp import fully_shard

        if mesh.mesh_dim_names and "data_parallel" in mesh.mesh_dim_names:
            if "tensor_parallel" in mesh.mesh_dim_names and mesh["tensor_parallel"].size() != 1:
                raise ValueError(
                    "AOTAlignmentModule shards over data parallelism only: use "
                    "ModelParallelStrategy(data_parallel_size=<world size>, tensor_parallel_size=1)"
                )
            mesh = mesh["data_parallel"]
        for model in (self.model, self.ref_model):
            if model is None:
                continue
            targets = self._shard_targets(model)
            classes = tuple(t for t in targets if isinstance(t, type))
            names = {t for t in targets if isinstance(t, str)}
            matched = [
                m for m in model.modules() if m is not model and (isinstance(m, classes) or type(m).__name__ in names)
            ]
            if not matched:
                raise ValueError(f"no submodule of {type(model).__name__} matches fsdp2_modules={list(targets)}")
            for m in matched:
                fully_shard(m, mesh=mesh, **self._fsdp2_kwargs)
            fully_shard(model, mesh=mesh, **self._fsdp2_kwargs)
        self._fsdp2_applied = True

    # ------------------------------------------------------------------ log-probs and loss

    def _model_inputs(self, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        keys = _PAIRED_KEYS if self.paired else _UNPAIRED_KEYS
        missing = [k for k in keys if k not in batch]
        if missing:
            collator = "PairedCollator" if self.paired else "UnpairedCollator"
            raise KeyError(
                f"{'paired' if self.paired else 'unpaired'} AOT batch is missing {missing}; "
                f"collate examples with otloss.integrations.lightning.{collator} (or AOTDataModule(paired={self.paired}))"
            )
        if not self.paired:
            return batch["input_ids"], batch["attention_mask"], batch["loss_mask"]
        length = max(batch["chosen_input_ids"].shape[-1], batch["rejected_input_ids"].shape[-1])
        return tuple(  # type: ignore[return-value]
            torch.cat([F.pad(batch[f"{side}_{k}"], (0, length - batch[f"{side}_{k}"].shape[-1])) for side in _SIDES])
            for k in ("input_ids", "attention_mask", "loss_mask")
        )

    def compute_logps(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Sequence log-probabilities of a batch under the policy and the reference.

        The reference runs first under ``torch.no_grad()``; the policy runs once on
        chosen and rejected sequences together (paired) or on all sequences (unpaired).

        Args:
            batch: from :class:`PairedCollator` (``[B, T]`` tensors) or
                :class:`UnpairedCollator` (``[B, T]`` tensors and a ``[B]`` ``label``).

        Returns:
            ``policy_chosen``, ``policy_rejected``, ``ref_chosen``, ``ref_rejected``:
            ``[B]`` each when paired; ``[n]`` and ``[m]`` (the desirable and
            undesirable samples) when unpaired. Float32.
        """
        return self._logps_and_plot(batch, plot=False)[0]

    def _logps_and_plot(self, batch: Mapping[str, Tensor], plot: bool) -> tuple[dict[str, Tensor], Any]:
        """:meth:`compute_logps` and, when ``plot`` and PLOT is on, the PLOT output on the policy's logits."""
        inputs = self._model_inputs(batch)
        with torch.no_grad():
            if self.ref_model is not None:
                ref = sequence_logps(self.ref_model, *inputs, reduction=self.logps_reduction)
            else:
                with disable_adapters(self.model):
                    ref = sequence_logps(self.model, *inputs, reduction=self.logps_reduction)
        policy, logits = sequence_logps(self.model, *inputs, reduction=self.logps_reduction, return_logits=True)
        if self.paired:
            chosen = torch.arange(policy.shape[0], device=policy.device) < batch["chosen_input_ids"].shape[0]
        else:
            chosen = batch["label"].to(device=policy.device, dtype=torch.bool)
        logps = dict(zip(_LOGP_KEYS, split_logps(policy, ref, chosen)))
        if not plot or self.plot is None:
            return logps, None
        labels = inputs[0][:, 1:].masked_fill(inputs[2][:, 1:] == 0, -100)
        return logps, plot_term(self.plot, logits[:, :-1], labels, chosen, input_embeddings(self.model))

    def _has_both_classes(self, batch: Mapping[str, Tensor]) -> bool:
        """Whether the batch that the loss sorts (local, or global with ``global_batch``) has both classes."""
        if self.paired:
            return True
        if "label" not in batch:
            self._model_inputs(batch)  # raises the KeyError
        label = batch["label"].to(torch.bool)
        return has_both_classes(self.loss_fn, int(label.sum()), int((~label).sum()), self.device)

    def compute_loss(self, batch: Mapping[str, Tensor]) -> tuple[Tensor | None, dict[str, Tensor]]:
        """The AOT loss of a batch and the log-probabilities it came from.

        With ``global_batch`` and several processes this is a collective (every
        rank must call it) and the loss is that of the global batch. In training
        mode with ``accumulate_quantiles`` the sort also sees the earlier
        micro-batches of the optimizer step.

        Returns:
            ``(loss, logps)``: ``loss`` is a scalar (``+ plot_alpha * L_PLOT`` with PLOT
            on), or ``None`` for an unpaired batch without a desirable or without an
            undesirable sample (the global batch with ``global_batch``); ``logps`` as in
            :meth:`compute_logps`, plus the detached ``plot/*`` metrics when a PLOT term was added.
        """
        both = self._has_both_classes(batch)
        logps, plot = self._logps_and_plot(batch, plot=both)
        if not both:
            return None, logps
        self.loss_fn.train(self.training)  # follows the module's flag, even when set directly
        loss = self.loss_fn(*(logps[k] for k in _LOGP_KEYS))
        if plot is None:
            return loss, logps
        logps.update(zip(_PLOT_KEYS, (plot.plot_term, plot.chosen_ot, plot.rejected_ot)))
        return loss + plot.loss, logps

    def _metrics(self, logps: Sequence[Tensor]) -> dict[str, float]:
        fsd_quantiles = self.fsd_quantiles if self.log_fsd else None
        return preference_metrics(
            logps, beta=self.reward_beta, pairs=self.paired, paired=self.paired, fsd_quantiles=fsd_quantiles
        )

    # ------------------------------------------------------------------ Lightning hooks

    def _batch_size(self, batch: Mapping[str, Tensor]) -> int:
        return int((batch["chosen_input_ids"] if self.paired else batch["input_ids"]).shape[0])

    def training_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> Tensor | None:
        """One AOT step; returns the loss, or ``None`` to skip (see the class docstring)."""
        skipped = {"on_step": False, "on_epoch": True, "reduce_fx": "sum", "batch_size": 1}
        if self.trainer.world_size == 1 and not self._has_both_classes(batch):
            self.log("train/skipped_batches", 1.0, **skipped)
            return None
        loss, logps = self.compute_loss(batch)
        if loss is None:
            # keep the DDP/FSDP gradient all-reduce in step: a zero loss through every trainable parameter
            self.log("train/skipped_batches", 1.0, **skipped)
            return 0.0 * (logps["policy_chosen"].sum() + logps["policy_rejected"].sum())
        bs = self._batch_size(batch)
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=bs)
        for key, value in self._metrics([logps[k].detach() for k in _LOGP_KEYS]).items():
            self.log(f"train/{key}", value, batch_size=bs)
        for key in _PLOT_KEYS:
            if key in logps:
                self.log(f"train/{key}", logps[key], batch_size=bs)
        return loss

    def on_fit_start(self) -> None:
        if self._memory is not None and getattr(self.trainer.strategy, "handles_gradient_accumulation", False):
            # the strategy (e.g. DeepSpeed) steps inside every micro-batch: the memory would never fill
            raise ValueError(
                f"accumulate_quantiles=True needs Lightning to accumulate the gradients, but "
                f"{type(self.trainer.strategy).__name__} accumulates them itself; pass accumulate_quantiles=False"
            )

    def on_train_epoch_start(self) -> None:
        if self._memory is not None:
            self._memory.reset()

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """Lightning's optimizer step; then forget the step's micro-batches (``accumulate_quantiles``)."""
        super().optimizer_step(*args, **kwargs)
        if self._memory is not None:
            self._memory.reset()

    def on_validation_epoch_start(self) -> None:
        self._val_logps, self._val_gathered = [], None

    def validation_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> Tensor | None:
        """Logs ``val/loss`` (epoch mean over batches) and stores the log-probabilities for the epoch-end diagnostics."""
        loss, logps = self.compute_loss(batch)
        if loss is not None:
            bs = self._batch_size(batch)
            for key, value in {"loss": loss, **{k: logps[k] for k in _PLOT_KEYS if k in logps}}.items():
                self.log(f"val/{key}", value, on_step=False, on_epoch=True, sync_dist=True, batch_size=bs)
        self._val_logps.append(tuple(logps[k].detach().float() for k in _LOGP_KEYS))
        return loss

    def _validation_logps(self) -> tuple[Tensor, ...]:
        """The epoch's four log-probability tensors, gathered over all ranks (a collective), on CPU; cached."""
        if self._val_gathered is None:
            parts = list(zip(*self._val_logps)) or [()] * 4
            local = [torch.cat(p) if p else torch.zeros(0, device=self.device) for p in parts]
            self._val_gathered = tuple(t.cpu() for t in gather_logps(local))
        return self._val_gathered

    def validation_scores(self) -> dict[str, Tensor]:
        """The current validation epoch's log-ratios, gathered over all ranks, on CPU.

        A collective when distributed: call it on every rank. The result is cached
        for the epoch (the :class:`QuantilePlotCallback` and the module's own
        epoch-end diagnostics share it).

        Returns:
            ``chosen`` and ``rejected`` (log-ratios ``logp_policy - logp_ref`` of the
            chosen / desirable and rejected / undesirable samples) and, when paired,
            ``policy_margins`` and ``ref_margins`` (``logp(chosen) - logp(rejected)``).
        """
        logps = self._validation_logps()
        scores = dict(zip(("chosen", "rejected"), aot_uv(logps, paired=False)))
        if self.paired:
            scores.update(zip(("policy_margins", "ref_margins"), aot_uv(logps, paired=True)))
        return scores

    def on_validation_epoch_end(self) -> None:
        logps = self._validation_logps()
        if logps[0].numel() and logps[1].numel():
            for key, value in self._metrics(logps).items():
                # computed from the gathered data: the same on every rank
                self.log(f"val/{key}", value, on_step=False, on_epoch=True, batch_size=int(logps[0].numel()))
        self._val_logps, self._val_gathered = [], None

    def configure_optimizers(self) -> Any:
        params = [p for p in self.model.parameters() if p.requires_grad]
        if self._optimizer == "adamw":
            opt = torch.optim.AdamW(
                params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay, **self._optimizer_kwargs
            )
        else:
            opt = self._optimizer(params)
            if not isinstance(opt, torch.optim.Optimizer):
                raise TypeError(f"the optimizer callable must return a torch.optim.Optimizer, got {type(opt).__name__}")
        if self._lr_scheduler is None:
            return opt
        sched = self._lr_scheduler(opt)
        if isinstance(sched, Mapping):
            return {"optimizer": opt, "lr_scheduler": dict(sched)}
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ------------------------------------------------------------------ checkpoints

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store the RNG states (torch CPU and CUDA, ``random``, numpy) so a resumed run draws the same dropout.

        Stored as tensors and plain Python values, so ``torch.load(weights_only=True)`` reads them.
        """
        rng: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        if importlib.util.find_spec("numpy") is not None:
            import numpy as np

            name, keys, pos, has_gauss, gauss = np.random.get_state()
            rng["numpy"] = (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss))
        checkpoint["otloss_rng_states"] = rng

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore the RNG states written by :meth:`on_save_checkpoint` (absent in other checkpoints: nothing done)."""
        rng = checkpoint.get("otloss_rng_states")
        if not rng:
            return
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        if "cuda" in rng and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(rng["cuda"])
        if "numpy" in rng:
            import numpy as np

            name, keys, pos, has_gauss, gauss = rng["numpy"]
            np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))


class AOTDataModule(pl.LightningDataModule):
    """Training (and optional validation) data for :class:`AOTAlignmentModule`.

    Examples are mappings of strings: ``{"prompt", "chosen", "rejected"}`` when
    ``paired``, ``{"prompt", "completion", "label"}`` (``label`` True = desirable)
    otherwise. Any sequence with ``len`` and integer indexing works (a list, a
    ``datasets.Dataset``).

    The training loader shuffles with a ``DistributedSampler`` seeded by ``seed``
    and reshuffled per epoch (Lightning calls ``set_epoch``); with several
    processes each rank gets its own shard. The order therefore depends only on
    ``seed`` and the epoch, which keeps a run resumed from an end-of-epoch
    checkpoint on the same batches.

    Args:
        tokenizer: a Hugging Face tokenizer.
        train_data: training examples.
        val_data: optional validation examples (not shuffled).
        paired: paired or unpaired examples.
        batch_size: per-process training batch size (pairs, or samples when unpaired).
        val_batch_size: defaults to ``batch_size``.
        max_length: see :class:`PairedCollator`.
        max_prompt_length: see :class:`PairedCollator`.
        add_eos: see :class:`PairedCollator`.
        pad_to_multiple_of: see :class:`PairedCollator`.
        shuffle: shuffle the training data.
        seed: shuffling seed.
        num_workers: ``DataLoader`` workers.
        drop_last: drop the last incomplete training batch.
    """

    def __init__(
        self,
        tokenizer: Any,
        train_data: Sequence[Mapping[str, Any]],
        val_data: Sequence[Mapping[str, Any]] | None = None,
        *,
        paired: bool = True,
        batch_size: int = 8,
        val_batch_size: int | None = None,
        max_length: int | None = None,
        max_prompt_length: int | None = None,
        add_eos: bool = True,
        pad_to_multiple_of: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        num_workers: int = 0,
        drop_last: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(paired, bool):
            raise TypeError(f"paired must be a bool, got {type(paired).__name__}")
        for name, value in (("batch_size", batch_size), ("val_batch_size", val_batch_size)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        keys = ("prompt", "chosen", "rejected") if paired else ("prompt", "completion", "label")
        for name, data in (("train_data", train_data), ("val_data", val_data)):
            if data is None:
                continue
            if len(data) == 0:
                raise ValueError(f"{name} is empty")
            first = data[0]
            if not isinstance(first, Mapping) or any(k not in first for k in keys):
                got = sorted(first) if isinstance(first, Mapping) else type(first).__name__
                raise ValueError(
                    f"{name} examples must be mappings with keys {list(keys)} for paired={paired}, got {got}"
                )
        collator_cls = PairedCollator if paired else UnpairedCollator
        self.collator = collator_cls(
            tokenizer,
            max_length=max_length,
            max_prompt_length=max_prompt_length,
            add_eos=add_eos,
            pad_to_multiple_of=pad_to_multiple_of,
        )
        self.train_data = train_data
        self.val_data = val_data
        self.paired = paired
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.num_workers = num_workers
        self.drop_last = drop_last

    def train_dataloader(self) -> DataLoader:
        world, rank = (1, 0) if self.trainer is None else (self.trainer.world_size, self.trainer.global_rank)
        sampler = DistributedSampler(
            self.train_data, num_replicas=world, rank=rank, shuffle=self.shuffle, seed=self.seed
        )
        return DataLoader(
            self.train_data,
            batch_size=self.batch_size,
            sampler=sampler,
            collate_fn=self.collator,
            num_workers=self.num_workers,
            drop_last=self.drop_last,
        )

    def val_dataloader(self) -> DataLoader | list:
        if self.val_data is None:
            return []
        return DataLoader(
            self.val_data,
            batch_size=self.val_batch_size,
            shuffle=False,
            collate_fn=self.collator,
            num_workers=self.num_workers,
        )


class QuantilePlotCallback(pl.Callback):
    """Plot reward and margin quantiles at the end of every validation (the AOT paper's Figure 1).

    Left panel: the quantile functions of the chosen (desirable) and rejected
    (undesirable) log-ratios ``logp_policy - logp_ref``. Right panel: when paired,
    the quantile functions of the policy margins and the reference margins
    ``logp(chosen) - logp(rejected)`` (AOT pushes the first above the second);
    when unpaired, the gap ``Q_chosen(t) - Q_rejected(t)`` (below zero: FSD
    violated at level ``t``).

    The figure is saved on global rank 0 as
    ``<dirpath>/aot_quantiles_epoch<E>_step<S>.png`` and sent to every logger that
    takes images: loggers with a ``log_image(key, images, step)`` method (e.g.
    ``WandbLogger``), ``TensorBoardLogger`` (``add_figure``) and ``MLFlowLogger``
    (``log_figure``). The sanity-check validation is skipped.

    Args:
        dirpath: where to save; ``None`` means ``<trainer.default_root_dir>/aot_quantiles``.
        every_n_epochs: plot every n-th validation epoch.
        num_levels: quantile levels evenly spaced in ``(0, 1)``.
        key: the image key for loggers.

    Attributes:
        paths: the PNG files written so far.
    """

    def __init__(
        self,
        dirpath: str | Path | None = None,
        every_n_epochs: int = 1,
        num_levels: int = 99,
        key: str = "val/aot_quantiles",
    ) -> None:
        super().__init__()
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be >= 1, got {every_n_epochs}")
        if num_levels < 2:
            raise ValueError(f"num_levels must be >= 2, got {num_levels}")
        try:
            import matplotlib  # noqa: F401
        except ImportError as exc:
            raise ImportError("QuantilePlotCallback needs matplotlib: " + install_hint("lightning")) from exc
        self.dirpath = None if dirpath is None else Path(dirpath)
        self.every_n_epochs = every_n_epochs
        self.num_levels = num_levels
        self.key = key
        self.paths: list[Path] = []

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not isinstance(pl_module, AOTAlignmentModule):
            raise TypeError(f"QuantilePlotCallback needs an AOTAlignmentModule, got {type(pl_module).__name__}")

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.current_epoch % self.every_n_epochs != 0:
            return
        scores = pl_module.validation_scores()  # collective: every rank calls it
        if not trainer.is_global_zero:
            return
        if scores["chosen"].numel() == 0 or scores["rejected"].numel() == 0:
            return
        fig = self.figure(
            scores, paired=pl_module.paired, title=f"epoch {trainer.current_epoch}, step {trainer.global_step}"
        )
        dirpath = self.dirpath or Path(trainer.default_root_dir) / "aot_quantiles"
        dirpath.mkdir(parents=True, exist_ok=True)
        path = dirpath / f"aot_quantiles_epoch{trainer.current_epoch}_step{trainer.global_step}.png"
        fig.savefig(path, dpi=100)
        self.paths.append(path)
        for logger in trainer.loggers:
            self._log_figure(logger, fig, path, trainer.global_step)

    def figure(self, scores: Mapping[str, Tensor], *, paired: bool, title: str = "") -> Any:
        """The two-panel ``matplotlib.figure.Figure`` for ``scores`` (see :meth:`AOTAlignmentModule.validation_scores`)."""
        from matplotlib.figure import Figure

        t = torch.linspace(0, 1, self.num_levels + 2, dtype=torch.float64)[1:-1]
        q = {k: quantile_function(v.double(), t).numpy() for k, v in scores.items() if v.numel()}
        tt = t.numpy()
        fig = Figure(figsize=(10, 4), layout="constrained")
        ax1, ax2 = fig.subplots(1, 2)
        ax1.plot(tt, q["chosen"], label="chosen")
        ax1.plot(tt, q["rejected"], label="rejected")
        ax1.set(xlabel="quantile level t", ylabel="log-ratio logp_policy - logp_ref", title="reward quantiles")
        ax1.legend()
        if paired and "policy_margins" in q and "ref_margins" in q:
            ax2.plot(tt, q["policy_margins"], label="policy")
            ax2.plot(tt, q["ref_margins"], label="reference")
            ax2.set(xlabel="quantile level t", ylabel="logp(chosen) - logp(rejected)", title="margin quantiles")
            ax2.legend()
        else:
            ax2.plot(tt, q["chosen"] - q["rejected"], label="Q_chosen - Q_rejected")
            ax2.axhline(0.0, color="grey", linewidth=0.8)
            ax2.set(xlabel="quantile level t", ylabel="quantile gap", title="FSD gap (below 0: violation)")
            ax2.legend()
        if title:
            fig.suptitle(title)
        return fig

    def _log_figure(self, logger: Any, fig: Any, path: Path, step: int) -> None:
        if callable(getattr(logger, "log_image", None)):
            logger.log_image(key=self.key, images=[str(path)], step=step)
            return
        experiment = getattr(logger, "experiment", None)
        if callable(getattr(experiment, "add_figure", None)):
            experiment.add_figure(self.key, fig, global_step=step)
        elif callable(getattr(experiment, "log_figure", None)) and getattr(logger, "run_id", None):
            experiment.log_figure(logger.run_id, fig, f"{self.key.replace('/', '_')}_step{step}.png")

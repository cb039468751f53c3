"""TRL adapter: :class:`AOTTrainer` and :class:`AOTConfig`, a drop-in for ``DPOTrainer(loss_type="aot")``.

``AOTTrainer`` subclasses TRL's ``DPOTrainer`` and replaces only the loss, with one
:class:`otloss.AOTLoss`; everything else (data preparation, the fused LM head, the
reference, logging, checkpoints) is TRL's. PLOT (:func:`otloss.plot_loss`) is one
option away: ``AOTConfig(plot_alpha=...)``, or :class:`PLOTDPOTrainer` for any
``DPOTrainer`` loss.

Example:
    >>> from otloss.integrations.trl import AOTConfig, AOTTrainer
    >>> args = AOTConfig(output_dir="out", paired=True, cost="logistic", beta=0.01)
    >>> trainer = AOTTrainer(model, args=args, train_dataset=dataset, processing_class=tokenizer)
    >>> trainer.train()

Requires ``trl>=1.15``: ``pip install "torch-otloss[trl]"`` (or ``pip install -e ".[trl]"`` from a checkout).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from otloss.integrations._common import (
    build_plot,
    gather_logps,
    has_both_classes,
    input_embeddings,
    install_hint,
    loss_module,
    plot_term,
    preference_metrics,
    split_logps,
    world_size,
)
from torch import Tensor
from torch.nn import functional as F
from torch.utils.data import DataLoader

from otloss.diagnostics import DEFAULT_QUANTILES
from otloss.distributed import QuantileMemory
from otloss.modules import AOTLoss
from otloss.sorting import SoftSort

try:
    import trl
    from datasets import Dataset, IterableDataset
    from packaging.version import Version
    from transformers import TrainerCallback
    from transformers.utils import is_torch_bf16_gpu_available, is_torch_xla_available
    from trl import DPOConfig, DPOTrainer
    from trl.trainer.kto_trainer import DataCollatorForUnpairedPreference, KTOTrainer
except ImportError as e:
    raise ImportError(
        "otloss.integrations.trl needs TRL and its dependencies (transformers, accelerate, datasets, peft): "
        + install_hint("trl")
    ) from e

_MIN_TRL = "1.15.0"
_MIRRORED_TRL = "1.16.0"  # the DPOTrainer._compute_loss that AOTTrainer._policy_forward mirrors
if Version(trl.__version__) < Version(_MIN_TRL):
    raise ImportError(
        f"otloss.integrations.trl needs trl>={_MIN_TRL} (the fused-LM-head DPOTrainer), found trl {trl.__version__}: "
        + install_hint("trl")
    )

__all__ = ["AOTConfig", "AOTTrainer", "PLOTDPOConfig", "PLOTDPOTrainer", "PLOTOptions"]

_LOSS_TYPES = {"aot": True, "aot_unpaired": False}
_EMPTY_CLASS = ("skip", "carry_over")
_NON_MODEL_KEYS = frozenset({"completion_mask", "ref_chosen_logps", "ref_rejected_logps", "label", "ref_logps"})
_PADDED_KEYS = {"input_ids": None, "attention_mask": 0, "completion_mask": 0}  # None: the pad token id


def _resolve_loss_type(loss_type: object, paired: object) -> tuple[bool, list[str]]:
    """Reconcile TRL's ``loss_type`` with ``paired``; returns ``(paired, [loss_type])``."""
    if paired is not None and not isinstance(paired, bool):
        raise TypeError(f"paired must be True, False or None, got {paired!r}")
    names = [] if loss_type is None else [loss_type] if isinstance(loss_type, str) else list(loss_type)
    if "aot_pair" in names:
        raise ValueError(
            "loss_type='aot_pair' is TRL's old name for the *unpaired* AOT loss (since renamed 'aot_unpaired'): "
            "it compares the distribution of chosen log-ratios with that of rejected log-ratios. "
            "Use AOTConfig(paired=False). For the paired loss (policy margins vs reference margins) use paired=True."
        )
    if len(names) > 1:
        raise ValueError(
            f"AOTTrainer computes a single AOT loss, got loss_type={names}. Combining losses is not supported: "
            "use paired=True (TRL 'aot') or paired=False (TRL 'aot_unpaired'), or trl.DPOTrainer for loss mixtures."
        )
    if names and names[0] not in _LOSS_TYPES:
        raise ValueError(
            f"AOTConfig only computes the AOT loss, got loss_type={names[0]!r}. Leave loss_type unset and choose "
            "paired=True ('aot') or paired=False ('aot_unpaired'); for other losses use trl.DPOConfig."
        )
    from_name = _LOSS_TYPES[names[0]] if names else None
    if paired is None:
        paired = True if from_name is None else from_name
    elif from_name is not None and from_name != paired:
        raise ValueError(
            f"loss_type={names[0]!r} contradicts paired={paired}: 'aot' is paired=True and 'aot_unpaired' is "
            "paired=False. Set only one of them."
        )
    return paired, ["aot" if paired else "aot_unpaired"]


def _build_loss(args: AOTConfig) -> AOTLoss:
    """Refuse options that AOT cannot honour; returns the one loss module the options describe."""
    if args.use_weighting:
        raise ValueError(
            "use_weighting=True (WPO weights) is not supported with AOT: the loss sorts the samples, so per-pair "
            "weights no longer line up with the terms they weight. Set use_weighting=False."
        )
    if args.f_divergence_type != "reverse_kl":
        raise ValueError(
            f"f_divergence_type={args.f_divergence_type!r} is not supported with AOT: the f-DPO "
            "reparameterisation only cancels in a chosen-minus-rejected reward difference, which AOT does not use. "
            "Set f_divergence_type='reverse_kl' (the default)."
        )
    if args.loss_weights is not None and list(args.loss_weights) != [1.0]:
        raise ValueError(
            f"loss_weights={args.loss_weights} is not supported: AOTTrainer computes a single loss. Leave it unset."
        )
    if args.empty_class not in _EMPTY_CLASS:
        raise ValueError(f"empty_class must be 'skip' or 'carry_over', got {args.empty_class!r}")
    if args.sort not in ("hard", "soft"):
        raise ValueError(f"sort must be 'hard' or 'soft', got {args.sort!r}")
    return loss_module(
        paired=args.paired,
        cost=args.cost,
        beta=args.beta,
        label_smoothing=args.label_smoothing,
        sort="hard" if args.sort == "hard" else SoftSort(regularization_strength=args.soft_sort_strength),
        backend=args.backend,
        global_batch=args.global_batch,
        accumulate_quantiles=args.accumulate_quantiles,
    )


@dataclass
class PLOTOptions:
    """The PLOT options of :class:`AOTConfig` and :class:`PLOTDPOConfig`: the loss gains ``plot_alpha * L_PLOT``.

    ``L_PLOT`` is :func:`otloss.plot_loss`'s token-level term (``base=None``, hinge push),
    on the policy's logits of the step and the model's input embedding matrix. TRL's
    fused LM head never forms the logits, so with ``plot_alpha > 0`` the trainer forms
    them once, from the hidden states of the policy forward (no second forward), over
    the columns from the first completion token on; their memory is that of one
    ``[2B, T, V]`` tensor in the model's dtype. Logged: ``plot/term`` (``L_PLOT``),
    ``plot/chosen_ot`` and ``plot/rejected_ot``.

    Args:
        plot_alpha: weight of ``L_PLOT``, ``>= 0``; ``0`` (default) turns PLOT off (the
            loss, metrics and work are exactly those without it).
        plot_mode: ``mode`` of :func:`otloss.token_ot_loss` (default ``"sequence"``).
        plot_cost: ``cost`` of :func:`otloss.token_ot_loss` (default ``"cosine"``).
        plot_epsilon: ``epsilon`` of :func:`otloss.token_ot_loss` (default ``0.05``).
        plot_margin: the hinge margin of the push on rejected responses; ``None`` is 1.0
            with the cosine cost and must be given with ``"sqeuclidean"``.
        plot_embedding_grad: let gradients flow into the embedding matrix (default:
            detached, a fixed geometry).
    """

    plot_alpha: float = field(default=0.0, metadata={"help": "Weight of the PLOT term; 0 turns PLOT off."})
    plot_mode: str = field(default="sequence", metadata={"help": "Token OT mode: 'sequence' or 'position'."})
    plot_cost: str = field(default="cosine", metadata={"help": "Token cost: 'cosine' or 'sqeuclidean'."})
    plot_epsilon: float = field(default=0.05, metadata={"help": "Entropic regularisation (cost units); 0: exact."})
    plot_margin: float | None = field(default=None, metadata={"help": "Hinge margin of the push (None: 1.0)."})
    plot_embedding_grad: bool = field(default=False, metadata={"help": "Let gradients flow into the embeddings."})

    def _build_plot(self):
        return build_plot(
            self.plot_alpha,
            self.plot_mode,
            self.plot_cost,
            self.plot_epsilon,
            self.plot_margin,
            self.plot_embedding_grad,
        )


def _bf16_off_without_an_accelerator(config: DPOConfig) -> None:
    """``bf16`` left unset, no bf16-capable accelerator, ``use_cpu`` not set: float32, not a refusal.

    ``DPOConfig`` turns an unset ``bf16`` on, and ``TrainingArguments`` then refuses to run on a
    machine without a bf16-capable GPU ("Your setup doesn't support bf16/gpu").
    """
    if config.bf16 is None and not config.fp16 and not config.use_cpu:
        if not (is_torch_bf16_gpu_available() or is_torch_xla_available()):
            config.bf16 = False


@dataclass
class PLOTDPOConfig(PLOTOptions, DPOConfig):
    """``DPOConfig`` plus the options of :class:`PLOTOptions`, for :class:`PLOTDPOTrainer`.

    ``bf16`` left unset is turned off on a machine without a bf16-capable accelerator (and
    without ``use_cpu=True``), as in :class:`AOTConfig`; everywhere else it follows ``DPOConfig``.
    """

    def __post_init__(self) -> None:
        self._build_plot()
        _bf16_off_without_an_accelerator(self)
        super().__post_init__()


class _PLOTMixin:
    """Adds ``plot_alpha * L_PLOT`` to a ``DPOTrainer`` subclass's loss (see :class:`PLOTOptions`)."""

    _SCALING = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling")

    def _init_plot(self) -> None:
        self.plot_loss = self.args._build_plot()
        if self.plot_loss is None:
            return
        inner = self.accelerator.unwrap_model(self.model)
        self._plot_lm = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
        config = self._plot_lm.config.get_text_config()
        scaled = [name for name in self._SCALING if getattr(config, name, None) not in (None, 1, 1.0)]
        if scaled:  # TRL's fused head applies them; lm_head(hidden states) would not
            raise ValueError(
                f"plot_alpha > 0 forms the logits as lm_head(hidden states), but {type(self._plot_lm).__name__} "
                f"also transforms them ({', '.join(scaled)}): PLOT does not support this model yet; set plot_alpha=0"
            )

    @contextlib.contextmanager
    def _plot_logits(self, inputs: dict[str, Tensor]) -> Iterator[list[tuple[Tensor, Tensor]]]:
        """Within the context, the first backbone call (the policy forward) yields ``(logits, labels)`` for PLOT.

        The logits are formed inside that forward, from its last hidden states, over
        the columns from the first completion token on (the earlier ones are never scored).
        """
        found: list[tuple[Tensor, Tensor]] = []
        if self.plot_loss is None:
            yield found
            return
        mask = inputs["completion_mask"][:, 1:] != 0
        start = int(mask.any(0).float().argmax())
        labels = inputs["input_ids"][:, 1:].masked_fill(~mask, -100)[:, start:]

        def keep(module, args, out) -> None:
            if not found:
                states = out[0][:, -inputs["input_ids"].size(1) :][:, start:-1]  # prompt-learning PEFT prepends
                head = self._plot_lm.get_output_embeddings()
                weight, bias = head.weight, head.bias
                if hasattr(weight, "full_tensor"):  # FSDP2: gathered whole, as TRL's fused head does
                    weight, bias = weight.full_tensor(), None if bias is None else bias.full_tensor()
                found.append((F.linear(states.to(weight.device), weight, bias), labels))

        hook = self._plot_lm.base_model.register_forward_hook(keep)
        try:
            yield found
        finally:
            hook.remove()

    def _add_plot(self, loss: Tensor, found: list[tuple[Tensor, Tensor]], chosen: Tensor) -> Tensor:
        """``loss + plot_alpha * L_PLOT`` (nothing added without a chosen and a rejected row); logs ``plot/*``.

        Every rank must call it when PLOT is on (the metrics are gathered).
        """
        if self.plot_loss is None:
            return loss
        if not found:
            raise RuntimeError(f"PLOT: the policy forward did not run {type(self._plot_lm).__name__}.base_model")
        logits, labels = found[0]
        out = plot_term(self.plot_loss, logits, labels, chosen, input_embeddings(self._plot_lm))
        values = torch.full((1, 3), float("nan"), device=loss.device)
        if out is not None:
            values = torch.stack([out.plot_term, out.chosen_ot, out.rejected_ot]).float()[None].to(loss.device)
            loss = loss + out.loss.to(loss.device)
        values = self.accelerator.gather_for_metrics(values).nanmean(0)
        if not values.isnan().all():
            metrics = self._metrics["train" if self.model.training else "eval"]
            for key, value in zip(("term", "chosen_ot", "rejected_ot"), values.tolist()):
                metrics[f"plot/{key}"].append(value)
        return loss


class _ResetQuantileMemory(TrainerCallback):
    """Empties the quantile memory when an optimizer step ends, and at the start of training and of each epoch."""

    def __init__(self, memory: QuantileMemory) -> None:
        self.memory = memory

    def on_train_begin(self, args, state, control, **kwargs):
        self.memory.reset()

    on_epoch_begin = on_step_end = on_train_begin


@dataclass
class AOTConfig(PLOTOptions, DPOConfig):
    r"""Configuration of :class:`AOTTrainer`: every ``DPOConfig`` option, with its default, plus the AOT ones below.

    ``loss_type`` accepts ``"aot"`` and ``"aot_unpaired"`` (TRL's names) or may be left
    unset in favour of ``paired``. Options AOT cannot honour (``use_weighting``, an
    ``f_divergence_type`` other than ``"reverse_kl"``, several loss types,
    ``loss_weights``) raise ``ValueError`` when the config or the trainer is built.

    ``beta`` keeps ``DPOConfig``'s default (``0.1``), so replacing
    ``DPOConfig(loss_type="aot")`` by ``AOTConfig`` trains with the same beta; the AOT
    paper uses ``0.01``: set ``beta=0.01`` to follow it. ``beta`` is the scale of the
    logistic cost, the margin of the hinge family and the factor of the
    ``rewards/*`` metrics.

    ``bf16``: left unset (``None``) on a machine without a bf16-capable accelerator
    and without ``use_cpu=True``, it is turned off (float32 training), where
    ``DPOConfig`` would turn it on and fail with "Your setup doesn't support bf16/gpu".
    Everywhere else it follows ``DPOConfig``.

    PLOT: the ``plot_*`` options of :class:`PLOTOptions` (``plot_alpha > 0`` adds
    ``plot_alpha * L_PLOT`` to the AOT loss).

    Args:
        paired: ``True`` is TRL's ``"aot"`` (the distribution of policy margins
            ``chosen - rejected`` must dominate that of the reference margins);
            ``False`` is TRL's ``"aot_unpaired"`` (the chosen log-ratios must dominate
            the rejected log-ratios; works on KTO-format data with unequal class
            counts). ``None`` follows ``loss_type`` and defaults to ``True``.
        cost: ``"logistic"`` (default, TRL's cost), ``"hinge"``, ``"squared_hinge"``
            or ``"least_squares"``.
        sort: ``"hard"`` (TRL's) or ``"soft"`` (:class:`otloss.SoftSort`).
        soft_sort_strength: regularisation strength of the soft sort (``0.1``, the paper's).
        backend: ``"auto"``, ``"torch"`` or ``"triton"``, as in :func:`otloss.ot_h_1d`
            (``"auto"`` runs otloss's fused Triton kernel on CUDA when it applies).
        global_batch: sort the values of all data-parallel ranks together (through
            :mod:`otloss.distributed`) instead of each rank's micro-batch. Same result
            as ``False`` in a single process.
        empty_class: what an unpaired training batch without a desirable or without
            an undesirable example does: ``"skip"`` (zero loss and zero gradient) or
            ``"carry_over"`` (its examples join the next batch).
        log_fsd: log the FSD diagnostics ``fsd/*`` at every step.
        accumulate_quantiles: with ``gradient_accumulation_steps > 1``, sort each
            training micro-batch together with the earlier micro-batches of the same
            optimizer step (:class:`otloss.QuantileMemory`, reset after every
            optimizer step). Evaluation never uses it.
    """

    loss_type: list[str] | None = field(default=None, metadata={"help": "'aot' or 'aot_unpaired'; or use `paired`."})
    paired: bool | None = field(default=None, metadata={"help": "True: TRL 'aot'. False: TRL 'aot_unpaired'."})
    cost: str = field(default="logistic", metadata={"help": "'logistic', 'hinge', 'squared_hinge', 'least_squares'."})
    sort: str = field(default="hard", metadata={"help": "'hard' or 'soft'."})
    soft_sort_strength: float = field(default=0.1, metadata={"help": "Regularisation strength of the soft sort."})
    backend: str = field(default="auto", metadata={"help": "'auto', 'torch' or 'triton' (otloss's fused kernel)."})
    global_batch: bool = field(default=False, metadata={"help": "Sort across data-parallel ranks."})
    empty_class: str = field(default="skip", metadata={"help": "Unpaired batch lacking a class: 'skip', 'carry_over'."})
    log_fsd: bool = field(default=True, metadata={"help": "Log FSD diagnostics (fsd/*)."})
    accumulate_quantiles: bool = field(default=False, metadata={"help": "Sort with the step's earlier micro-batches."})

    def __post_init__(self) -> None:
        self.paired, self.loss_type = _resolve_loss_type(self.loss_type, self.paired)
        _build_loss(self)
        self._build_plot()
        _bf16_off_without_an_accelerator(self)
        super().__post_init__()


def _is_unpaired_format(dataset: Dataset | IterableDataset) -> bool:
    """KTO-format rows: ``prompt``/``completion``/``label`` (or their tokenised ``*_ids``)."""
    first = next(iter(dataset))
    return "label" in first and ("completion" in first or "completion_ids" in first)


class AOTTrainer(_PLOTMixin, DPOTrainer):
    """TRL ``DPOTrainer`` whose loss is otloss's AOT loss.

    Takes ``DPOTrainer``'s arguments (``model``, ``ref_model``, ``args``,
    ``train_dataset``, ``eval_dataset``, ``processing_class``, ``peft_config``, ...);
    ``args`` must be an :class:`AOTConfig`.

    Data formats:

    * preference rows (``prompt``, ``chosen``, ``rejected``; TRL's format), with
      ``paired=True`` (TRL ``"aot"``) or ``paired=False`` (TRL ``"aot_unpaired"``).
      With ``cost="logistic"`` and hard sort, the loss and its gradient equal TRL's.
    * KTO rows (``prompt``, ``completion``, ``label``; ``label`` True for desirable),
      ``paired=False`` only, tokenised by TRL's KTO preprocessing. Each batch compares
      the log-ratios of its desirable examples with those of its undesirable ones,
      whatever their numbers. A training batch lacking one class follows
      ``args.empty_class``; an evaluation batch lacking one is skipped (loss 0).

    Reference: as in TRL, an explicit ``ref_model``; else, with PEFT, the model with
    its adapters disabled; else, with ``precompute_ref_log_probs=True``, the initial
    model's log-probabilities computed once before training; else a second copy of
    the model loaded from its name or path.

    The loss module is ``self.aot_loss``, one :class:`otloss.AOTLoss` built once
    (``global_batch=True`` is its ``"auto"``): in training mode it uses the quantile
    memory (``accumulate_quantiles``), in evaluation it does not.

    Logged metrics: TRL's (``rewards/*`` = ``beta * (logp_policy - logp_ref)``,
    ``logps/*``, ``logits/*``, ``entropy``, ``num_tokens``, ``mean_token_accuracy``)
    and, with ``args.log_fsd``, ``fsd/area``, ``fsd/w1``, ``fsd/w2`` and
    ``fsd/quantile_margin_<t>`` for ``t`` in 0.1, 0.25, 0.5, 0.75, 0.9, on the two
    distributions the loss compares (log-ratio units, not multiplied by ``beta``). On
    KTO data, ``rewards/accuracies`` is the fraction of (desirable, undesirable) pairs
    ranked correctly and ``rewards/margins`` the difference of the class means;
    ``aot/num_chosen``, ``aot/num_rejected`` and ``aot/empty_class`` (fraction of
    batches lacking a class) are logged too. With ``plot_alpha > 0`` the loss gains
    ``plot_alpha * L_PLOT`` (see :class:`PLOTOptions`; on KTO data each desirable
    completion is pulled and each undesirable one pushed), logged as ``plot/*``.

    Raises:
        TypeError: ``args`` is not an :class:`AOTConfig`.
        ValueError: an option AOT cannot honour (see :class:`AOTConfig`); KTO-format
            data with ``paired=True`` or with ``ld_alpha``; train and eval data in
            different formats.
    """

    _tag_names: ClassVar[list[str]] = ["trl", "dpo", "aot", "otloss"]
    _name = "AOT"
    calculate_KL: ClassVar[bool] = False  # read by TRL's KTO preprocessing: no KL completions

    def __init__(
        self,
        model: Any,
        ref_model: Any = None,
        args: AOTConfig | None = None,
        data_collator: Any = None,
        train_dataset: Dataset | IterableDataset | None = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        compute_metrics: Any = None,
        callbacks: Any = None,
        **kwargs: Any,
    ) -> None:
        if args is None:
            name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "") or "model"
            args = AOTConfig(f"{str(name).rstrip('/').split('/')[-1]}-AOT")
        if not isinstance(args, AOTConfig):
            raise TypeError(
                f"AOTTrainer needs an AOTConfig, got {type(args).__name__}. Build one with the same options, e.g. "
                "AOTConfig(output_dir=..., paired=True, beta=...) in place of DPOConfig(..., loss_type='aot')."
            )
        # The config may have been edited after construction: check it again, before any model is loaded.
        args.paired, args.loss_type = _resolve_loss_type(args.loss_type, args.paired)
        self.aot_loss = _build_loss(args)
        if self.aot_loss.memory is not None:
            callbacks = [*(callbacks or []), _ResetQuantileMemory(self.aot_loss.memory)]
        if train_dataset is None:
            raise ValueError("`train_dataset` is required")
        self._unpaired_data = _is_unpaired_format(train_dataset)
        for ds in eval_dataset.values() if isinstance(eval_dataset, dict) else [eval_dataset]:
            if ds is not None and _is_unpaired_format(ds) != self._unpaired_data:
                raise ValueError(
                    "train_dataset and eval_dataset must share one format: preference rows (prompt, chosen, "
                    "rejected) or KTO rows (prompt, completion, label)."
                )
        if self._unpaired_data and args.paired:
            raise ValueError(
                "KTO-format data (prompt, completion, label) has no chosen/rejected pairs: set paired=False "
                "(unpaired AOT), or use preference rows (prompt, chosen, rejected) for paired=True."
            )
        if self._unpaired_data and args.ld_alpha is not None:
            raise ValueError(
                "ld_alpha (LD-DPO length weighting) needs chosen/rejected pairs and does not apply to KTO-format "
                "data: leave ld_alpha=None."
            )
        self._carry: dict[str, Tensor] | None = None
        super().__init__(
            model=model,
            ref_model=ref_model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            compute_metrics=compute_metrics,
            callbacks=callbacks,
            **kwargs,
        )
        if self._unpaired_data and data_collator is None:
            self.data_collator = self._unpaired_collator()
        self._init_plot()
        world = world_size()
        if args.global_batch and world > 1 and self.accelerator.num_processes != world:
            # the sort would gather the same, unsharded batches from every process
            raise ValueError(
                f"global_batch=True: torch.distributed has {world} processes but the Trainer runs "
                f"{self.accelerator.num_processes}, so the processes do not share out the data. "
                "On a CPU launch pass --use_cpu True (TrainingArguments.use_cpu) so that the Trainer joins the group."
            )

    # ------------------------------------------------------------------ KTO-format data

    def _unpaired_collator(self) -> DataCollatorForUnpairedPreference:
        return DataCollatorForUnpairedPreference(
            pad_token_id=self._tokenizer.pad_token_id,
            max_length=self.args.max_length,
            pad_to_multiple_of=self.args.pad_to_multiple_of,
        )

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        if not _is_unpaired_format(dataset):
            return super()._prepare_dataset(dataset, processing_class, args, dataset_name)
        first = next(iter(dataset))
        if "prompt_ids" in first and "completion_ids" in first:
            return dataset  # already tokenised
        missing = {"prompt", "completion", "label"} - set(first)
        if missing:
            raise ValueError(f"KTO-format rows need 'prompt', 'completion' and 'label'; missing {sorted(missing)}")
        labels = set(dataset["label"]) if isinstance(dataset, Dataset) else {first["label"]}
        if not labels <= {True, False}:  # bool, or 0/1
            raise ValueError(f"'label' must be a bool (True: desirable), got {sorted(map(repr, labels))}")
        # TRL's own KTO preprocessing (EOS, chat templates, tokenisation, max_length filter). Any name but "train":
        # that one adds KTO's advice on desirable/undesirable loss weights, which AOT does not have.
        return KTOTrainer._prepare_dataset(self, dataset, processing_class, args, f"{dataset_name} (unpaired AOT)")

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None and self._unpaired_data:
            self._signature_columns = ["prompt_ids", "completion_ids", "label", "ref_logps"]
        super()._set_signature_columns_if_needed()

    def _precompute_ref_logps(self, dataset: Dataset, name: str, batch_size: int) -> Dataset:
        if not _is_unpaired_format(dataset):
            return super()._precompute_ref_logps(dataset, name, batch_size)
        if isinstance(dataset, IterableDataset):
            raise ValueError(
                "precompute_ref_log_probs=True needs a map-style Dataset, got an IterableDataset. Set "
                "precompute_ref_log_probs=False."
            )
        if "ref_logps" in dataset.column_names:
            dataset = dataset.remove_columns("ref_logps")
        loader = DataLoader(
            dataset,
            batch_size=batch_size,
            collate_fn=self._unpaired_collator(),
            num_workers=self.args.dataloader_num_workers,
            pin_memory=self.args.dataloader_pin_memory,
            shuffle=False,
        )
        model = self.ref_model if self.ref_model is not None else self.model
        if self.ref_model is None and self.is_deepspeed_enabled:
            from trl.models import prepare_deepspeed

            if self._precompute_engine is None:
                self._precompute_engine = prepare_deepspeed(self.model, self.accelerator)
            model = self._precompute_engine
        chunks = [
            self.accelerator.gather_for_metrics(self._reference_logps(model, batch)).float().cpu()
            for batch in self.accelerator.prepare(loader)
        ]
        return dataset.add_column("ref_logps", torch.cat(chunks).tolist())

    def _merge_carry(self, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
        carry, self._carry = self._carry, None
        if carry is None or set(carry) != set(inputs):
            return inputs
        length = max(carry["input_ids"].size(1), inputs["input_ids"].size(1))
        merged = {}
        for key, value in inputs.items():
            old = carry[key].to(value.device)
            if key in _PADDED_KEYS:
                pad = self._tokenizer.pad_token_id if _PADDED_KEYS[key] is None else _PADDED_KEYS[key]
                old, value = (F.pad(t, (0, length - t.size(1)), value=pad) for t in (old, value))
            merged[key] = torch.cat([old, value], dim=0)
        return merged

    # ------------------------------------------------------------------ loss

    def _reference_logps(self, model, inputs: dict[str, Tensor]) -> Tensor:
        """Reference sequence log-probabilities of every row of the batch, by TRL's ``compute_ref_log_probs``."""
        ref_inputs = {k: v for k, v in inputs.items() if k not in ("label", "ref_logps")}
        return torch.cat(self.compute_ref_log_probs(model, ref_inputs), dim=0)

    def _policy_forward(self, model, inputs: dict[str, Tensor], chosen_rows: Tensor, mode: str):
        """Policy sequence log-probabilities with gradient, and TRL's token-level metrics.

        No TRL hook exposes either, so this is a copy of the corresponding parts of
        ``DPOTrainer._compute_loss`` in trl 1.16.0 (``_MIRRORED_TRL``): the fused LM
        head, LD-DPO's ``ld_alpha``, the MoE ``aux_loss`` metric, ``entropy``,
        ``num_tokens``, ``logits/*`` and ``mean_token_accuracy``, with the chosen rows
        given by ``chosen_rows`` (KTO batches are not split in halves). Compare it with
        that method when TRL changes.

        Returns:
            ``(logps, outputs, model_kwargs)``: ``[rows]`` log-probabilities, the model
            output and the keyword arguments the model took.
        """
        model_kwargs = {k: v for k, v in inputs.items() if k not in _NON_MODEL_KEYS}
        model_kwargs["use_cache"] = False
        if self.aux_loss_enabled:
            model_kwargs["output_router_logits"] = True
        mask = inputs["completion_mask"][..., 1:]
        labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
        outputs = model(**model_kwargs, labels=labels, fused_lm_head=True)
        seq_len = mask.size(1)
        per_token_logps = outputs.log_probs[:, -seq_len:]
        if self.ld_alpha is None:
            logps = per_token_logps.sum(dim=1)
        else:  # LD-DPO, preference rows only (refused for KTO data in __init__)
            comp_pos = mask.cumsum(dim=1)
            chosen_lens, rejected_lens = mask.sum(dim=1).long().chunk(2, dim=0)
            shared = torch.minimum(chosen_lens, rejected_lens).repeat(2).unsqueeze(1)
            tail = (per_token_logps * (comp_pos > shared)).sum(dim=1)
            logps = (per_token_logps * ((comp_pos > 0) & (comp_pos <= shared))).sum(dim=1) + self.ld_alpha * tail

        acc, metrics = self.accelerator, self._metrics[mode]
        if self.aux_loss_enabled:
            metrics["aux_loss"].append(acc.gather_for_metrics(outputs.aux_loss).mean().item())
        entropy_sum = acc.gather_for_metrics((outputs.entropy[:, -seq_len:].detach() * mask).sum()).sum()
        total_tokens = acc.gather_for_metrics(mask.sum()).sum()
        metrics["entropy"].append((entropy_sum / total_tokens).item() if total_tokens > 0 else 0.0)
        if mode == "train":
            num_tokens = acc.gather_for_metrics(inputs["attention_mask"].sum()).sum().item()
            self._total_train_tokens += num_tokens // self._tp_size
        metrics["num_tokens"] = [self._total_train_tokens]
        mean_logits, is_top1 = outputs.mean_logits[:, -seq_len:], outputs.is_top1[:, -seq_len:]
        for rows, name in ((chosen_rows, "chosen"), (~chosen_rows, "rejected")):
            row_mask = mask[rows].bool()
            total = acc.gather_for_metrics(mean_logits[rows][row_mask].sum()).sum().item()
            count = acc.gather_for_metrics(row_mask.sum()).sum().item()
            metrics[f"logits/{name}"].append(total / count if count > 0 else 0.0)
            if name == "chosen":
                correct = acc.gather_for_metrics((is_top1[rows] & row_mask).sum()).sum()
                tokens = acc.gather_for_metrics(row_mask.sum()).sum()
                metrics["mean_token_accuracy"].append((correct / tokens).item() if tokens > 0 else 0.0)
        return logps, outputs, model_kwargs

    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        kto = "label" in inputs
        carry_over = kto and mode == "train" and self.args.empty_class == "carry_over"
        if carry_over:
            inputs = self._merge_carry(inputs)
        rows = inputs["input_ids"].size(0)
        device = inputs["input_ids"].device
        chosen_rows = inputs["label"].to(device, torch.bool) if kto else torch.arange(rows, device=device) < rows // 2
        with self._plot_logits(inputs) as plot_logits:
            logps, outputs, model_kwargs = self._policy_forward(model, inputs, chosen_rows, mode)

        # Reference: precomputed, or TRL's compute_ref_log_probs (ref model or disabled adapters).
        if not self.precompute_ref_logps:
            ref_logps = self._reference_logps(self.ref_model if self.ref_model is not None else self.model, inputs)
        elif kto:
            ref_logps = inputs["ref_logps"]
        else:
            ref_logps = torch.cat([inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]], dim=0)
        dtype = torch.promote_types(logps.dtype, ref_logps.dtype)
        logps, ref_logps = logps.to(dtype), ref_logps.to(device=logps.device, dtype=dtype)
        chosen_rows = chosen_rows.to(logps.device)
        four = split_logps(logps, ref_logps, chosen_rows)

        self.aot_loss.train(mode == "train")  # the quantile memory serves training only
        if has_both_classes(self.aot_loss, four[0].numel(), four[1].numel(), logps.device):
            loss = self.aot_loss(*four)
        else:  # zero loss and gradient, but every parameter stays in the graph (DDP needs it)
            loss = (logps * 0.0).sum()
            if carry_over:
                keep = max(1, self.args.per_device_train_batch_size)
                self._carry = {k: v[-keep:].detach() for k, v in inputs.items()}
        loss = self._add_plot(loss, plot_logits, chosen_rows)  # adds nothing where the batch lacks a class
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * outputs.aux_loss

        metrics = self._metrics[mode]
        gathered = gather_logps(four)
        fsd_quantiles = DEFAULT_QUANTILES if self.args.log_fsd else None
        for key, value in preference_metrics(
            gathered, beta=self.beta, pairs=not kto, paired=self.args.paired, fsd_quantiles=fsd_quantiles
        ).items():
            metrics[key if key.startswith(("rewards/", "logps/")) else "fsd/" + key.removeprefix("fsd_")].append(value)
        if kto:
            metrics["aot/num_chosen"].append(float(gathered[0].numel()))
            metrics["aot/num_rejected"].append(float(gathered[1].numel()))
            metrics["aot/empty_class"].append(float(four[0].numel() == 0 or four[1].numel() == 0))

        if return_outputs:
            with torch.no_grad():
                outputs = model(**model_kwargs)
            return loss, outputs
        return loss


class PLOTDPOTrainer(_PLOTMixin, DPOTrainer):
    """TRL's ``DPOTrainer`` whose loss (any ``loss_type``) gains ``plot_alpha * L_PLOT`` (see :class:`PLOTOptions`).

    Takes ``DPOTrainer``'s arguments; ``args`` must be a :class:`PLOTDPOConfig`. The
    base loss, its metrics and everything else are TRL's; with ``plot_alpha=0`` the
    trainer is ``DPOTrainer``.

    Example:
        >>> args = PLOTDPOConfig(output_dir="out", beta=0.1, plot_alpha=0.5, plot_mode="position")
        >>> PLOTDPOTrainer(model, args=args, train_dataset=dataset, processing_class=tokenizer).train()

    Raises:
        TypeError: ``args`` is not a :class:`PLOTDPOConfig`.
    """

    _tag_names: ClassVar[list[str]] = ["trl", "dpo", "plot", "otloss"]

    def __init__(self, model: Any, ref_model: Any = None, args: PLOTDPOConfig | None = None, **kwargs: Any) -> None:
        if not isinstance(args, PLOTDPOConfig):
            raise TypeError(f"PLOTDPOTrainer needs a PLOTDPOConfig (DPOConfig plus plot_*), got {type(args).__name__}")
        super().__init__(model, ref_model=ref_model, args=args, **kwargs)
        self._init_plot()

    def _compute_loss(self, model, inputs, return_outputs):
        with self._plot_logits(inputs) as plot_logits:
            out = super()._compute_loss(model, inputs, return_outputs)
        rows = inputs["input_ids"].size(0)
        chosen = torch.arange(rows, device=inputs["input_ids"].device) < rows // 2  # TRL's [chosen; rejected] batch
        loss = self._add_plot(out[0] if return_outputs else out, plot_logits, chosen)
        return (loss, out[1]) if return_outputs else loss

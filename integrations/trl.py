"""TRL adapter: :class:`AOTTrainer` and :class:`AOTConfig`, a drop-in for ``DPOTrainer(loss_type="aot")``.

``AOTTrainer`` subclasses TRL's ``DPOTrainer`` and replaces only the loss: the
sequence log-probabilities come from TRL's fused LM head, the reference from TRL's
``compute_ref_log_probs`` (an explicit ``ref_model``, a PEFT model with its adapters
disabled, or log-probabilities precomputed with ``precompute_ref_log_probs=True``),
and the dataset preparation, collation, logging and checkpointing are TRL's. The
loss is one :class:`otloss.AOTLoss`, built once in ``__init__``.

What it adds over TRL's ``loss_type="aot"`` / ``"aot_unpaired"``:

* any AOT cost of otloss (``logistic``, ``hinge``, ``squared_hinge``,
  ``least_squares``), hard or soft sorting;
* unpaired training on KTO-format data (``prompt``, ``completion``, boolean
  ``label``) with whatever numbers of desirable and undesirable examples a batch
  holds (the quantile coupling of ``n != m`` samples); a batch without one of the
  classes is skipped or carried over (``empty_class``), never a crash or a NaN;
* FSD diagnostics in the logs (``fsd/area``, ``fsd/w1``, ``fsd/w2``,
  ``fsd/quantile_margin_<t>``).

Example:
    >>> from otloss.integrations.trl import AOTConfig, AOTTrainer
    >>> args = AOTConfig(output_dir="out", paired=True, cost="logistic", beta=0.01)
    >>> trainer = AOTTrainer(model, args=args, train_dataset=dataset, processing_class=tokenizer)
    >>> trainer.train()

Requires ``trl>=1.15`` (``pip install 'otloss[trl]'``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from otloss.diagnostics import DEFAULT_QUANTILES, fsd_report
from otloss.distributed import QuantileMemory
from otloss.modules import AOTLoss
from otloss.sorting import SoftSort

try:
    import trl
    from datasets import Dataset, IterableDataset
    from packaging.version import Version
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer
    from trl.data_utils import _tokenize, common_prefix_length, is_conversational
    from trl.trainer.kto_trainer import DataCollatorForUnpairedPreference
except ImportError as e:
    raise ImportError(
        "otloss.integrations.trl needs TRL and its dependencies (transformers, accelerate, datasets, peft): "
        "pip install 'otloss[trl]'"
    ) from e

_MIN_TRL = "1.15.0"
if Version(trl.__version__) < Version(_MIN_TRL):
    raise ImportError(
        f"otloss.integrations.trl needs trl>={_MIN_TRL} (the fused-LM-head DPOTrainer), found trl {trl.__version__}: "
        "pip install -U 'otloss[trl]'"
    )

__all__ = ["AOTConfig", "AOTTrainer"]


_LOSS_TYPES = {"aot": True, "aot_unpaired": False}
_SORTS = ("hard", "soft")
_BACKENDS = ("auto", "torch", "triton")
_EMPTY_CLASS = ("skip", "carry_over")
# Batch keys that are not model inputs.
_NON_MODEL_KEYS = frozenset({"completion_mask", "ref_chosen_logps", "ref_rejected_logps", "label", "ref_logps"})
_PADDED_KEYS = {"input_ids": None, "attention_mask": 0, "completion_mask": 0}  # None: the pad token id


def _distributed_world() -> int:
    """Size of the default process group, 1 when ``torch.distributed`` is not initialised."""
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _resolve_loss_type(loss_type: object, paired: object) -> tuple[bool, list[str]]:
    """Reconcile TRL's ``loss_type`` with ``paired``; returns ``(paired, [loss_type])``."""
    if paired is not None and not isinstance(paired, bool):
        raise TypeError(f"paired must be True, False or None, got {paired!r}")
    if loss_type is None:
        names: list[str] = []
    elif isinstance(loss_type, str):
        names = [loss_type]
    else:
        names = list(loss_type)
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
    from_name = None
    if names:
        if names[0] not in _LOSS_TYPES:
            raise ValueError(
                f"AOTConfig only computes the AOT loss, got loss_type={names[0]!r}. Leave loss_type unset and choose "
                "paired=True ('aot') or paired=False ('aot_unpaired'); for other losses use trl.DPOConfig."
            )
        from_name = _LOSS_TYPES[names[0]]
    if paired is None:
        paired = True if from_name is None else from_name
    elif from_name is not None and from_name != paired:
        raise ValueError(
            f"loss_type={names[0]!r} contradicts paired={paired}: 'aot' is paired=True and 'aot_unpaired' is "
            "paired=False. Set only one of them."
        )
    return paired, ["aot" if paired else "aot_unpaired"]


def _build_sort(sort: object, strength: float) -> str | SoftSort:
    if sort not in _SORTS:
        raise ValueError(f"sort must be 'hard' or 'soft', got {sort!r}")
    return "hard" if sort == "hard" else SoftSort(regularization_strength=strength)


def _loss_module(args: AOTConfig, *, global_batch: bool = False, memory: QuantileMemory | None = None) -> AOTLoss:
    """The AOT loss module the (checked) options describe."""
    return AOTLoss(
        paired=args.paired,
        cost=args.cost,
        beta=args.beta,
        label_smoothing=args.label_smoothing,
        sort=_build_sort(args.sort, args.soft_sort_strength),
        backend=args.backend,
        global_batch=global_batch,
        memory=memory,
    )


class _ResetQuantileMemory(TrainerCallback):
    """Empties the quantile memory when an optimizer step ends, and at the start of training and of each epoch."""

    def __init__(self, memory: QuantileMemory) -> None:
        self.memory = memory

    def on_train_begin(self, args, state, control, **kwargs):
        self.memory.reset()

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.memory.reset()

    def on_step_end(self, args, state, control, **kwargs):
        self.memory.reset()


def _check_options(args: AOTConfig) -> AOTLoss:
    """Refuse options that AOT cannot honour; returns the loss module the options describe."""
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
    if args.backend not in _BACKENDS:
        raise ValueError(f"backend must be 'auto', 'torch' or 'triton', got {args.backend!r}")
    if args.empty_class not in _EMPTY_CLASS:
        raise ValueError(f"empty_class must be 'skip' or 'carry_over', got {args.empty_class!r}")
    return _loss_module(args)


@dataclass
class AOTConfig(DPOConfig):
    r"""Configuration of :class:`AOTTrainer`: every ``DPOConfig`` option plus the AOT ones below.

    ``loss_type`` accepts ``"aot"`` and ``"aot_unpaired"`` (TRL's names) or may be left
    unset in favour of ``paired``. Options AOT cannot honour (``use_weighting``, an
    ``f_divergence_type`` other than ``"reverse_kl"``, several loss types,
    ``loss_weights``) raise ``ValueError`` when the config or the trainer is built.

    Args:
        paired: ``True`` is TRL's ``"aot"`` (the distribution of policy margins
            ``chosen - rejected`` must dominate that of the reference margins);
            ``False`` is TRL's ``"aot_unpaired"`` (the chosen log-ratios must dominate
            the rejected log-ratios; works on KTO-format data with unequal class
            counts). ``None`` follows ``loss_type`` and defaults to ``True``.
        cost: an otloss AOT cost name: ``"logistic"`` (default, TRL's cost),
            ``"hinge"``, ``"squared_hinge"`` or ``"least_squares"``.
        beta: scale of the logistic cost, margin of the hinge family; also the factor
            of TRL's ``rewards/*`` metrics. Defaults to ``0.01``, the AOT paper's value.
        label_smoothing: logistic cost only (TRL's conservative smoothing).
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
            optimizer step), so later micro-batches see the quantiles of a larger
            batch. Evaluation never uses it.
    """

    beta: float = field(
        default=0.01,
        metadata={"help": "Logistic scale / hinge margin, and the factor of the rewards/* metrics (paper: 0.01)."},
    )
    loss_type: list[str] | None = field(
        default=None,
        metadata={"help": "'aot' (paired) or 'aot_unpaired'; leave unset and use `paired` instead."},
    )
    paired: bool | None = field(
        default=None,
        metadata={"help": "True: TRL 'aot' (paired margins). False: TRL 'aot_unpaired' (chosen vs rejected)."},
    )
    cost: str = field(
        default="logistic",
        metadata={"help": "AOT cost: 'logistic', 'hinge', 'squared_hinge' or 'least_squares'."},
    )
    sort: str = field(default="hard", metadata={"help": "'hard' or 'soft'."})
    soft_sort_strength: float = field(default=0.1, metadata={"help": "Regularisation strength of the soft sort."})
    backend: str = field(default="auto", metadata={"help": "'auto', 'torch' or 'triton' (otloss's fused kernel)."})
    global_batch: bool = field(
        default=False, metadata={"help": "Sort across data-parallel ranks (otloss.distributed)."}
    )
    empty_class: str = field(
        default="skip",
        metadata={"help": "Unpaired batch without one class: 'skip' or 'carry_over' (to the next batch)."},
    )
    log_fsd: bool = field(default=True, metadata={"help": "Log FSD diagnostics (fsd/*)."})
    accumulate_quantiles: bool = field(
        default=False,
        metadata={"help": "Sort each micro-batch with the earlier ones of its optimizer step (otloss.QuantileMemory)."},
    )

    def __post_init__(self) -> None:
        self.paired, self.loss_type = _resolve_loss_type(self.loss_type, self.paired)
        _check_options(self)
        super().__post_init__()


def _is_unpaired_format(dataset: Dataset | IterableDataset) -> bool:
    """KTO-format rows: ``prompt``/``completion``/``label`` (or their tokenised ``*_ids``)."""
    first = next(iter(dataset))
    return "label" in first and ("completion" in first or "completion_ids" in first)


def _pad_to(t: Tensor, length: int, value: int) -> Tensor:
    if t.size(1) == length:
        return t
    pad = t.new_full((t.size(0), length - t.size(1)), value)
    return torch.cat([t, pad], dim=1)


class AOTTrainer(DPOTrainer):
    """TRL ``DPOTrainer`` whose loss is otloss's AOT loss.

    Takes ``DPOTrainer``'s arguments (``model``, ``ref_model``, ``args``,
    ``train_dataset``, ``eval_dataset``, ``processing_class``, ``peft_config``, ...);
    ``args`` must be an :class:`AOTConfig`.

    Data formats:

    * preference rows (``prompt``, ``chosen``, ``rejected``; TRL's format): works
      with ``paired=True`` (TRL ``"aot"``) and ``paired=False`` (TRL
      ``"aot_unpaired"``). With ``cost="logistic"`` and hard sort, the loss and its
      gradient equal TRL's.
    * KTO rows (``prompt``, ``completion``, ``label``; ``label`` True for desirable):
      ``paired=False`` only. Each batch compares the log-ratios of its desirable
      examples with those of its undesirable ones, whatever their numbers. A
      training batch lacking one class follows ``args.empty_class``; an evaluation
      batch lacking one is skipped (loss 0).

    Reference: as in TRL, an explicit ``ref_model``; else, with PEFT, the model with
    its adapters disabled; else, with ``precompute_ref_log_probs=True``, the initial
    model's log-probabilities computed once before training; else a second copy of
    the model loaded from its name or path.

    Logged metrics: TRL's (``rewards/chosen``, ``rewards/rejected``,
    ``rewards/accuracies``, ``rewards/margins``, ``logps/*``, ``logits/*``,
    ``entropy``, ``num_tokens``, ``mean_token_accuracy``) and, with
    ``args.log_fsd``, ``fsd/area``, ``fsd/w1``, ``fsd/w2`` and
    ``fsd/quantile_margin_<t>`` for ``t`` in 0.1, 0.25, 0.5, 0.75, 0.9, computed on
    the two distributions the loss compares (in log-ratio units, not multiplied by
    ``beta``). On KTO data, ``rewards/accuracies`` is the fraction of
    (desirable, undesirable) pairs of the batch ranked correctly and
    ``rewards/margins`` the difference of the class means; ``aot/num_chosen``,
    ``aot/num_rejected`` and ``aot/empty_class`` (fraction of batches lacking a class)
    are logged too.

    Raises:
        TypeError: ``args`` is not an :class:`AOTConfig`.
        ValueError: an option AOT cannot honour (see :class:`AOTConfig`); KTO-format
            data with ``paired=True`` or with ``ld_alpha``; train and eval data in
            different formats.
    """

    _tag_names: ClassVar[list[str]] = ["trl", "dpo", "aot", "otloss"]
    _name = "AOT"

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
        optimizers: tuple[Any, Any] = (None, None),
        quantization_config: Any = None,
        peft_config: Any = None,
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
        self.aot_loss = _check_options(args)
        self._global_aot_loss = _loss_module(args, global_batch=True) if args.global_batch else None
        # training losses: the same, with the memory of this optimizer step's micro-batches
        self._memory = QuantileMemory() if args.accumulate_quantiles else None
        self._train_aot_loss = _loss_module(args, memory=self._memory) if self._memory is not None else self.aot_loss
        self._train_global_aot_loss = self._global_aot_loss
        if self._memory is not None and args.global_batch:
            self._train_global_aot_loss = _loss_module(args, global_batch=True, memory=self._memory)
        if self._memory is not None:
            callbacks = [*(callbacks or []), _ResetQuantileMemory(self._memory)]
        if train_dataset is None:
            raise ValueError("`train_dataset` is required")
        self._unpaired_data = _is_unpaired_format(train_dataset)
        evals = eval_dataset.values() if isinstance(eval_dataset, dict) else [eval_dataset]
        for ds in evals:
            if ds is not None and _is_unpaired_format(ds) != self._unpaired_data:
                raise ValueError(
                    "train_dataset and eval_dataset must share one format: preference rows (prompt, chosen, "
                    "rejected) or KTO rows (prompt, completion, label)."
                )
        if self._unpaired_data:
            if args.paired:
                raise ValueError(
                    "KTO-format data (prompt, completion, label) has no chosen/rejected pairs: set paired=False "
                    "(unpaired AOT), or use preference rows (prompt, chosen, rejected) for paired=True."
                )
            if args.ld_alpha is not None:
                raise ValueError(
                    "ld_alpha (LD-DPO length weighting) needs chosen/rejected pairs and does not apply to KTO-format "
                    "data: leave ld_alpha=None."
                )
        self._user_collator = data_collator is not None
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
            optimizers=optimizers,
            quantization_config=quantization_config,
            peft_config=peft_config,
        )
        if self._unpaired_data and not self._user_collator:
            self.data_collator = self._unpaired_collator()
        world = _distributed_world()
        if args.global_batch and world > 1 and self.accelerator.num_processes != world:
            # the sort would gather the same, unsharded batches from every process
            raise ValueError(
                f"global_batch=True: torch.distributed has {world} processes but the Trainer runs "
                f"{self.accelerator.num_processes}, so the processes do not share out the data. "
                "On a CPU launch pass --use_cpu True (TrainingArguments.use_cpu) so that the Trainer joins the group."
            )

    # ------------------------------------------------------------------ data

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
        map_kwargs: dict[str, Any] = {}
        if isinstance(dataset, Dataset):
            map_kwargs["num_proc"] = args.dataset_num_proc
        eos = self._tokenizer.eos_token

        def tokenize(example: dict[str, Any]) -> dict[str, Any]:
            label = example["label"]
            if label not in (True, False):  # bool, or 0/1
                raise ValueError(f"'label' must be a bool (True: desirable), got {label!r}")
            if is_conversational(example):
                prompt_ids = _tokenize(processing_class, example["prompt"], add_generation_prompt=True)["input_ids"]
                full_ids = _tokenize(processing_class, example["prompt"] + example["completion"])["input_ids"]
            else:
                completion = example["completion"]
                if eos is not None and not completion.endswith(eos):
                    completion = completion + eos
                prompt_ids = _tokenize(processing_class, example["prompt"])["input_ids"]
                full_ids = _tokenize(processing_class, example["prompt"] + completion)["input_ids"]
            cut = common_prefix_length(prompt_ids, full_ids)
            return {"prompt_ids": prompt_ids[:cut], "completion_ids": full_ids[cut:], "label": bool(label)}

        dataset = dataset.map(tokenize, **map_kwargs)
        if args.max_length is not None:
            max_length = args.max_length
            dataset = dataset.filter(lambda ex: len(ex["prompt_ids"]) < max_length, **map_kwargs)
        return dataset

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
        loader = DataLoader(
            dataset.remove_columns([c for c in ("ref_logps",) if c in dataset.column_names]),
            batch_size=batch_size,
            collate_fn=self._unpaired_collator(),
            num_workers=self.args.dataloader_num_workers,
            pin_memory=self.args.dataloader_pin_memory,
            shuffle=False,
        )
        loader = self.accelerator.prepare(loader)
        model = self.ref_model if self.ref_model is not None else self.model
        if self.ref_model is None and self.is_deepspeed_enabled:
            from trl.models import prepare_deepspeed

            if self._precompute_engine is None:
                self._precompute_engine = prepare_deepspeed(self.model, self.accelerator)
            model = self._precompute_engine
        chunks = []
        for batch in loader:
            ref = self._reference_logps(model, batch)
            chunks.append(self.accelerator.gather_for_metrics(ref).float().cpu())
        values = torch.cat(chunks).tolist()
        if "ref_logps" in dataset.column_names:
            dataset = dataset.remove_columns("ref_logps")
        return dataset.add_column("ref_logps", values)

    # ------------------------------------------------------------------ loss

    def _reference_logps(self, model, inputs: dict[str, Tensor]) -> Tensor:
        """Reference sequence log-probabilities of every row of the batch, by TRL's ``compute_ref_log_probs``."""
        ref_inputs = {k: v for k, v in inputs.items() if k not in ("label", "ref_logps")}
        return torch.cat(self.compute_ref_log_probs(model, ref_inputs), dim=0)

    def _aot_loss_value(
        self, chosen_logps: Tensor, rejected_logps: Tensor, ref_chosen_logps: Tensor, ref_rejected_logps: Tensor
    ) -> Tensor:
        """The AOT loss of one micro-batch.

        With ``global_batch=True`` and several processes, the sort sees the values of
        every rank (:mod:`otloss.distributed`: the value is the global loss on every
        rank, and after DDP's gradient averaging each parameter gets the gradient of
        the loss of the concatenated global batch). Every rank must then call it.
        With one process it is the local loss. In training with
        ``accumulate_quantiles=True`` the sort also sees the earlier micro-batches of
        the optimizer step. Override it to change how batches are pooled.
        """
        train = self.model.training
        if self._global_aot_loss is not None and _distributed_world() > 1:
            loss_fn = self._train_global_aot_loss if train else self._global_aot_loss
        else:
            loss_fn = self._train_aot_loss if train else self.aot_loss
        return loss_fn(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)

    def _merge_carry(self, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
        if self._carry is None:
            return inputs
        carry, self._carry = self._carry, None
        if set(carry) != set(inputs):
            return inputs
        length = max(carry["input_ids"].size(1), inputs["input_ids"].size(1))
        merged = {}
        for key, value in inputs.items():
            old = carry[key].to(value.device)
            if key in _PADDED_KEYS:
                pad = self._tokenizer.pad_token_id if _PADDED_KEYS[key] is None else _PADDED_KEYS[key]
                old, value = _pad_to(old, length, pad), _pad_to(value, length, pad)
            merged[key] = torch.cat([old, value], dim=0)
        return merged

    def _stash(self, inputs: dict[str, Tensor]) -> None:
        keep = max(1, self.args.per_device_train_batch_size)
        self._carry = {k: v[-keep:].detach() for k, v in inputs.items()}

    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        kto = "label" in inputs
        if kto and mode == "train" and self.args.empty_class == "carry_over":
            inputs = self._merge_carry(inputs)

        # Policy log-probabilities: TRL's fused LM head, as in DPOTrainer._compute_loss.
        model_kwargs = {k: v for k, v in inputs.items() if k not in _NON_MODEL_KEYS}
        model_kwargs["use_cache"] = False
        if self.aux_loss_enabled:
            model_kwargs["output_router_logits"] = True
        completion_mask = inputs["completion_mask"]
        shift_completion_mask = completion_mask[..., 1:]
        labels = inputs["input_ids"].masked_fill(completion_mask == 0, -100)
        outputs = model(**model_kwargs, labels=labels, fused_lm_head=True)
        seq_len = shift_completion_mask.size(1)
        per_token_logps = outputs.log_probs[:, -seq_len:]
        if self.ld_alpha is None:
            logps = per_token_logps.sum(dim=1)
        else:  # LD-DPO, preference rows only (refused for KTO data in __init__)
            comp_pos = shift_completion_mask.cumsum(dim=1)
            comp_lens = shift_completion_mask.sum(dim=1).long()
            chosen_lens, rejected_lens = comp_lens.chunk(2, dim=0)
            shared_lens = torch.minimum(chosen_lens, rejected_lens)
            shared_lens = torch.cat([shared_lens, shared_lens], dim=0).to(per_token_logps.device)
            shared_mask = (comp_pos > 0) & (comp_pos <= shared_lens.unsqueeze(1))
            tail_mask = comp_pos > shared_lens.unsqueeze(1)
            logps = (per_token_logps * shared_mask).sum(dim=1) + self.ld_alpha * (per_token_logps * tail_mask).sum(
                dim=1
            )

        # Reference log-probabilities: precomputed, or TRL's compute_ref_log_probs (ref model or disabled adapters).
        if self.precompute_ref_logps:
            if kto:
                ref_logps = inputs["ref_logps"]
            else:
                ref_logps = torch.cat([inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]], dim=0)
        else:
            ref_logps = self._reference_logps(self.ref_model if self.ref_model is not None else self.model, inputs)
        dtype = torch.promote_types(logps.dtype, ref_logps.dtype)
        logps, ref_logps = logps.to(dtype), ref_logps.to(device=logps.device, dtype=dtype)

        if kto:
            chosen_rows = inputs["label"].to(device=logps.device, dtype=torch.bool)
        else:
            chosen_rows = torch.arange(logps.size(0), device=logps.device) < logps.size(0) // 2
        chosen_logps, rejected_logps = logps[chosen_rows], logps[~chosen_rows]
        ref_chosen_logps, ref_rejected_logps = ref_logps[chosen_rows], ref_logps[~chosen_rows]
        counts = (chosen_logps.numel(), rejected_logps.numel())
        if self._global_aot_loss is not None and _distributed_world() > 1:
            # The global loss is a collective: every rank must agree on skipping, so count over all ranks.
            counts = self.accelerator.reduce(torch.tensor(counts, device=logps.device), reduction="sum").tolist()
        empty = counts[0] == 0 or counts[1] == 0

        if empty:
            # Zero loss and zero gradient, but every parameter stays in the graph (DDP needs it).
            loss = (logps * 0.0).sum()
            if mode == "train" and self.args.empty_class == "carry_over":
                self._stash(inputs)
        else:
            loss = self._aot_loss_value(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)

        if self.aux_loss_enabled:
            aux_loss = outputs.aux_loss
            loss = loss + self.router_aux_loss_coef * aux_loss
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(aux_loss).mean().item())

        self._log_metrics(
            mode,
            inputs,
            outputs,
            seq_len,
            shift_completion_mask,
            chosen_rows,
            (chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps),
            kto,
        )

        if return_outputs:
            with torch.no_grad():
                outputs = model(**model_kwargs)
            return loss, outputs
        return loss

    # --------------------------------------------------------------- metrics

    def _gather(self, t: Tensor, same_size: bool) -> Tensor:
        """Gather a 1-D tensor from every rank (sizes may differ across ranks when ``same_size`` is False)."""
        if self.accelerator.num_processes == 1:
            return t
        if same_size:
            return self.accelerator.gather(t)
        t = self.accelerator.pad_across_processes(t.float(), dim=0, pad_index=float("nan"))
        t = self.accelerator.gather(t)
        return t[~torch.isnan(t)]

    def _log_metrics(self, mode, inputs, outputs, seq_len, shift_completion_mask, chosen_rows, logps4, kto):
        metrics = self._metrics[mode]
        acc = self.accelerator
        chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps = (t.detach() for t in logps4)

        # Token-level metrics, as TRL logs them.
        mask = shift_completion_mask
        entropy_sum = acc.gather_for_metrics((outputs.entropy[:, -seq_len:].detach() * mask).sum()).sum()
        total_tokens = acc.gather_for_metrics(mask.sum()).sum()
        metrics["entropy"].append((entropy_sum / total_tokens).item() if total_tokens > 0 else 0.0)
        if mode == "train":
            num_tokens = acc.gather_for_metrics(inputs["attention_mask"].sum()).sum().item()
            self._total_train_tokens += num_tokens // self._tp_size
        metrics["num_tokens"] = [self._total_train_tokens]
        mean_logits = outputs.mean_logits[:, -seq_len:]
        is_top1 = outputs.is_top1[:, -seq_len:]
        for rows, name in ((chosen_rows, "chosen"), (~chosen_rows, "rejected")):
            row_mask = mask[rows].bool()
            total = acc.gather_for_metrics(mean_logits[rows][row_mask].sum()).sum().item()
            count = acc.gather_for_metrics(row_mask.sum()).sum().item()
            metrics[f"logits/{name}"].append(total / count if count > 0 else 0.0)
            if name == "chosen":
                correct = acc.gather_for_metrics((is_top1[rows] & row_mask).sum()).sum()
                tokens = acc.gather_for_metrics(row_mask.sum()).sum()
                metrics["mean_token_accuracy"].append((correct / tokens).item() if tokens > 0 else 0.0)

        # Rewards (beta * log-ratio), as TRL logs them.
        same = not kto
        chosen_ratios = chosen_logps - ref_chosen_logps
        rejected_ratios = rejected_logps - ref_rejected_logps
        chosen_rewards = self._gather(self.beta * chosen_ratios, same)
        rejected_rewards = self._gather(self.beta * rejected_ratios, same)
        has_chosen, has_rejected = chosen_rewards.numel() > 0, rejected_rewards.numel() > 0
        if has_chosen:
            metrics["rewards/chosen"].append(chosen_rewards.mean().item())
            metrics["logps/chosen"].append(self._gather(chosen_logps, same).mean().item())
        if has_rejected:
            metrics["rewards/rejected"].append(rejected_rewards.mean().item())
            metrics["logps/rejected"].append(self._gather(rejected_logps, same).mean().item())
        if kto:
            metrics["aot/num_chosen"].append(float(chosen_rewards.numel()))
            metrics["aot/num_rejected"].append(float(rejected_rewards.numel()))
            metrics["aot/empty_class"].append(float(chosen_logps.numel() == 0 or rejected_logps.numel() == 0))
            if has_chosen and has_rejected:
                pairs = (chosen_rewards[:, None] > rejected_rewards[None, :]).float()
                metrics["rewards/accuracies"].append(pairs.mean().item())
                metrics["rewards/margins"].append((chosen_rewards.mean() - rejected_rewards.mean()).item())
        else:
            metrics["rewards/accuracies"].append((chosen_rewards > rejected_rewards).float().mean().item())
            metrics["rewards/margins"].append((chosen_rewards - rejected_rewards).mean().item())

        # FSD diagnostics of the two distributions the loss compares.
        if not self.args.log_fsd:
            return
        if self.args.paired:
            u, v = chosen_logps - rejected_logps, ref_chosen_logps - ref_rejected_logps
        else:
            u, v = chosen_ratios, rejected_ratios
        u, v = self._gather(u.float(), same), self._gather(v.float(), same)
        if u.numel() == 0 or v.numel() == 0 or not (torch.isfinite(u).all() and torch.isfinite(v).all()):
            return
        for key, value in fsd_report(u.cpu(), v.cpu(), DEFAULT_QUANTILES).items():
            metrics["fsd/" + key.removeprefix("fsd_")].append(value)

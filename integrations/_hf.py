"""Framework-neutral Hugging Face helpers shared by the otloss adapters.

Everything here needs only torch at import time; ``peft`` is imported lazily and
only to recognise PEFT models. The helpers work with any causal language model
whose forward takes ``input_ids`` and ``attention_mask`` and returns an object
with ``.logits`` (every ``transformers`` ``*ForCausalLM``, PEFT-wrapped or not),
and with any tokenizer that maps a string to ``{"input_ids": [...]}`` when called.

Layout of a tokenised sequence (right padding)::

    [ prompt tokens | completion tokens (+ eos) | pad ... ]
      loss_mask = 0    loss_mask = 1                0

The log-probability of a sequence is the sum (or mean) over the completion tokens
of ``log p(token_t | tokens_<t)``; prompt and padding tokens are masked out.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from typing import Any, Literal

import torch
from torch import Tensor, nn

__all__ = [
    "PairedCollator",
    "UnpairedCollator",
    "check_transformers_peft",
    "disable_adapters",
    "is_peft_model",
    "sequence_logps",
    "token_logps",
    "tokenize_example",
    "unwrap_model",
]


# --------------------------------------------------------------------------- models


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip DDP/FSDP/``torch.compile`` wrappers: ``.module``, ``._fsdp_wrapped_module``, ``._orig_mod``."""
    for _ in range(16):  # at most 16 levels of wrapping
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_fsdp_wrapped_module"):
            model = model._fsdp_wrapped_module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            break
    return model


def is_peft_model(model: nn.Module) -> bool:
    """Whether the reference can be taken from ``model`` by disabling its adapters.

    True for a ``peft.PeftModel`` and for a ``transformers`` model with adapters added
    through its PEFT integration (``model.add_adapter(...)``), after unwrapping
    DDP/FSDP/compile wrappers.
    """
    inner = unwrap_model(model)
    if getattr(inner, "_hf_peft_config_loaded", False):
        return True
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(inner, PeftModel)


def check_transformers_peft() -> None:
    """Refuse transformers' own PEFT integration (``model.add_adapter(...)``) where it cannot run.

    transformers 5.24 and later need peft 0.22 or later for it (``add_adapter``,
    ``disable_adapters``, ``enable_adapters``); transformers 5.23 works with peft 0.20
    and later. A ``peft.PeftModel`` (``peft.get_peft_model``) does not go through this
    integration and works with either.

    Raises:
        ImportError: transformers >= 5.24 with peft < 0.22, naming the versions that work.
    """
    from packaging.version import Version

    transformers, peft = metadata.version("transformers"), metadata.version("peft")
    if Version(transformers) >= Version("5.24") and Version(peft) < Version("0.22"):
        raise ImportError(
            f"transformers {transformers} needs peft>=0.22 for adapters added with model.add_adapter(...), found peft "
            f"{peft}. Versions that work: transformers<5.24 with peft>=0.20 (e.g. transformers 5.23 with peft 0.21.2), "
            "or transformers>=5.24 with peft>=0.22. Or wrap the model with peft.get_peft_model(model, LoraConfig(...)), "
            "which works with either."
        )


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[None]:
    """Context in which ``model`` runs without its PEFT adapters (the frozen base model).

    Only module flags are switched: no weight is copied or moved, so this works
    on a model whose layers are sharded (FSDP) or replicated (DDP).

    Raises:
        TypeError: ``model`` has no PEFT adapters (see :func:`is_peft_model`).
        ImportError: adapters added through transformers' integration, with versions
            that cannot disable them (see :func:`check_transformers_peft`).
    """
    inner = unwrap_model(model)
    if getattr(inner, "_hf_peft_config_loaded", False) and not hasattr(inner, "disable_adapter"):
        check_transformers_peft()
        inner.disable_adapters()
        try:
            yield
        finally:
            inner.enable_adapters()
        return
    if not is_peft_model(inner):
        raise TypeError(f"{type(inner).__name__} has no PEFT adapters to disable")
    with inner.disable_adapter():
        yield


def token_logps(logits: Tensor, labels: Tensor) -> Tensor:
    """``log softmax(logits)[..., label]`` computed in float32 (float64 for float64 logits).

    Args:
        logits: ``[B, T, V]``.
        labels: ``[B, T]`` token ids (any value where masked later; must be in ``[0, V)``).

    Returns:
        ``[B, T]`` log-probabilities. Full-precision logits go through one
        ``logsumexp``; low-precision ones row by row, to bound the float32 copy at
        one row of ``[T, V]``.
    """
    idx = labels.unsqueeze(-1)
    if logits.dtype in (torch.float32, torch.float64):
        return logits.gather(-1, idx).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    rows = [torch.log_softmax(row.float(), dim=-1).gather(-1, i).squeeze(-1) for row, i in zip(logits, idx)]
    return torch.stack(rows)


def sequence_logps(
    model: Callable[..., Any],
    input_ids: Tensor,
    attention_mask: Tensor,
    loss_mask: Tensor,
    *,
    reduction: Literal["sum", "mean"] = "sum",
    return_logits: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Log-probability of the completion part of each sequence under a causal LM.

    Token ``t`` is scored by the logits at position ``t - 1``, so position 0 is
    never scored (every prompt must hold at least one token; the collators check).

    Args:
        model: a causal LM; called as ``model(input_ids=..., attention_mask=..., use_cache=False)``.
        input_ids: ``[B, T]`` right-padded token ids.
        attention_mask: ``[B, T]``, 1 on real tokens.
        loss_mask: ``[B, T]``, 1 on the completion tokens to score.
        reduction: ``"sum"`` (the sequence log-probability, as in the AOT paper) or
            ``"mean"`` (per scored token: length-normalised).
        return_logits: also return the model's ``[B, T, V]`` logits (the same tensor, no copy).

    Returns:
        ``[B]`` float32 log-probabilities (float64 for a float64 model), and the logits when
        ``return_logits``.
    """
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape or loss_mask.shape != input_ids.shape:
        raise ValueError(
            "input_ids, attention_mask and loss_mask must all be [B, T], got "
            f"{tuple(input_ids.shape)}, {tuple(attention_mask.shape)}, {tuple(loss_mask.shape)}"
        )
    out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    logits = out.logits if hasattr(out, "logits") else out[0]
    lp = token_logps(logits[:, :-1], input_ids[:, 1:])
    mask = loss_mask[:, 1:].to(torch.bool)
    total = lp.masked_fill(~mask, 0.0).sum(-1)
    if reduction == "mean":
        total = total / mask.sum(-1).clamp_min(1).to(total.dtype)
    return (total, logits) if return_logits else total


# --------------------------------------------------------------------------- data


def _ids(tokenizer: Any, text: str, add_special_tokens: bool) -> list[int]:
    if not isinstance(text, str):
        raise TypeError(f"expected a string to tokenise, got {type(text).__name__}")
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


def _check_lengths(max_length: int | None, max_prompt_length: int | None) -> None:
    if max_length is not None and max_length < 2:
        raise ValueError(f"max_length must be at least 2 (one prompt and one completion token), got {max_length}")
    if max_prompt_length is not None and max_prompt_length < 1:
        raise ValueError(f"max_prompt_length must be at least 1, got {max_prompt_length}")


def tokenize_example(
    tokenizer: Any,
    prompt: str,
    completion: str,
    *,
    max_length: int | None = None,
    max_prompt_length: int | None = None,
    add_eos: bool = True,
) -> tuple[list[int], list[int]]:
    """Token ids of ``prompt + completion`` and the mask of completion tokens.

    The prompt is tokenised with the tokenizer's special tokens (a BOS token if it
    adds one), the completion without, then the EOS token is appended when
    ``add_eos`` and the tokenizer has one. Apply any chat template to the strings
    beforehand.

    Truncation: the prompt keeps its last ``max_prompt_length`` tokens (the ones
    next to the completion); then, if the whole exceeds ``max_length``, the
    completion is cut from the right, keeping at least one completion token (the
    prompt is cut further from the left if it must).

    Returns:
        ``(input_ids, loss_mask)``, two lists of equal length.

    Raises:
        ValueError: the prompt or the completion tokenises to nothing, or the
            lengths are too small to keep a prompt token and a completion token.
    """
    _check_lengths(max_length, max_prompt_length)
    p = _ids(tokenizer, prompt, True)
    c = _ids(tokenizer, completion, False)
    eos = getattr(tokenizer, "eos_token_id", None)
    if add_eos and eos is not None:
        c.append(int(eos))
    if not p:
        raise ValueError(
            f"prompt {prompt!r} tokenises to no token: the first completion token could not be scored "
            "(use a non-empty prompt or a tokenizer that adds a BOS token)"
        )
    if not c:
        raise ValueError(f"completion {completion!r} tokenises to no token (and no EOS was appended)")
    if max_prompt_length is not None and len(p) > max_prompt_length:
        p = p[-max_prompt_length:]
    if max_length is not None and len(p) + len(c) > max_length:
        budget = max_length - len(p)
        if budget < 1:
            p = p[-(max_length - 1) :]
            budget = 1
        c = c[:budget]
    return p + c, [0] * len(p) + [1] * len(c)


def _pad_id(tokenizer: Any) -> int:
    ids = (getattr(tokenizer, name, None) for name in ("pad_token_id", "eos_token_id"))
    return int(next((i for i in ids if i is not None), 0))


def _pad(rows: Sequence[list[int]], length: int, value: int) -> Tensor:
    out = torch.full((len(rows), length), value, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return out


def _padded(rows: Sequence[tuple[list[int], list[int]]], multiple: int | None, pad: int) -> dict[str, Tensor]:
    """``input_ids``, ``attention_mask`` and ``loss_mask`` of ``(ids, mask)`` rows, right-padded to one length."""
    length = max(len(ids) for ids, _ in rows)
    length = -(-length // multiple) * multiple if multiple else length
    return {
        "input_ids": _pad([ids for ids, _ in rows], length, pad),
        "attention_mask": _pad([[1] * len(ids) for ids, _ in rows], length, 0),
        "loss_mask": _pad([mask for _, mask in rows], length, 0),
    }


def _field(example: Mapping[str, Any], key: str, kind: str) -> Any:
    if not isinstance(example, Mapping):
        raise TypeError(f"{kind} examples must be mappings, got {type(example).__name__}")
    if key not in example:
        raise KeyError(f"{kind} example is missing the key {key!r}; it has {sorted(example)}")
    return example[key]


@dataclass
class _CollatorBase:
    tokenizer: Any
    max_length: int | None = None
    max_prompt_length: int | None = None
    add_eos: bool = True
    pad_to_multiple_of: int | None = None

    def __post_init__(self) -> None:
        if not callable(self.tokenizer):
            raise TypeError("tokenizer must be callable: tokenizer(text, add_special_tokens=...) -> {'input_ids': ...}")
        _check_lengths(self.max_length, self.max_prompt_length)
        if self.pad_to_multiple_of is not None and self.pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be positive, got {self.pad_to_multiple_of}")

    def _tok(self, prompt: str, completion: str) -> tuple[list[int], list[int]]:
        return tokenize_example(
            self.tokenizer,
            prompt,
            completion,
            max_length=self.max_length,
            max_prompt_length=self.max_prompt_length,
            add_eos=self.add_eos,
        )


@dataclass
class PairedCollator(_CollatorBase):
    """Collate ``{"prompt", "chosen", "rejected"}`` string examples into padded tensors.

    Chosen and rejected sequences are right-padded to one common length ``T`` so
    that a trainer can run them through the model as one ``[2B, T]`` batch.
    Padding uses the tokenizer's pad token (else its EOS token, else 0); padded
    positions carry ``attention_mask = loss_mask = 0``, so their value is never used.

    Args:
        tokenizer: a Hugging Face tokenizer (or any callable with that interface).
        max_length: optional cap on prompt + completion tokens; see :func:`tokenize_example`.
        max_prompt_length: optional cap on prompt tokens (kept from the end).
        add_eos: append the tokenizer's EOS token to each completion.
        pad_to_multiple_of: round ``T`` up to a multiple of this.

    Returns (when called on a list of ``B`` examples):
        A dict of ``[B, T]`` long tensors: ``chosen_input_ids``, ``chosen_attention_mask``,
        ``chosen_loss_mask``, ``rejected_input_ids``, ``rejected_attention_mask``,
        ``rejected_loss_mask``.
    """

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, Tensor]:
        if len(examples) == 0:
            raise ValueError("cannot collate an empty list of examples")
        chosen, rejected = [], []
        for ex in examples:
            prompt = _field(ex, "prompt", "paired")
            chosen.append(self._tok(prompt, _field(ex, "chosen", "paired")))
            rejected.append(self._tok(prompt, _field(ex, "rejected", "paired")))
        both = _padded(chosen + rejected, self.pad_to_multiple_of, _pad_id(self.tokenizer))
        b = len(chosen)
        return {
            f"{side}_{k}": v[rows]
            for k, v in both.items()
            for side, rows in (("chosen", slice(b)), ("rejected", slice(b, None)))
        }


@dataclass
class UnpairedCollator(_CollatorBase):
    """Collate ``{"prompt", "completion", "label"}`` examples (``label`` True = desirable).

    Padding and truncation as in :class:`PairedCollator`. A batch may hold any
    mix of desirable and undesirable examples, including none of one kind: the
    trainer decides what to do with such a batch.

    Returns (when called on a list of ``B`` examples):
        ``input_ids``, ``attention_mask``, ``loss_mask``: ``[B, T]`` long tensors;
        ``label``: ``[B]`` bool tensor.
    """

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, Tensor]:
        if len(examples) == 0:
            raise ValueError("cannot collate an empty list of examples")
        rows, labels = [], []
        for ex in examples:
            rows.append(self._tok(_field(ex, "prompt", "unpaired"), _field(ex, "completion", "unpaired")))
            label = _field(ex, "label", "unpaired")
            if isinstance(label, Tensor):
                label = label.item()
            if label not in (True, False, 0, 1):
                raise ValueError(f"label must be a bool (or 0/1), got {label!r}")
            labels.append(bool(label))
        return {**_padded(rows, self.pad_to_multiple_of, _pad_id(self.tokenizer)), "label": torch.tensor(labels)}

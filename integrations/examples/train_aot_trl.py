"""Align a causal LM with AOT (otloss's TRL adapter).

Install from a checkout with ``pip install -e ".[trl]"`` (or ``pip install "torch-otloss[trl]"``).

The same script trains a tiny local model on CPU and a 7B model on GPUs: every
``AOTConfig`` / ``DPOConfig`` / ``TrainingArguments`` option, TRL's ``ModelConfig``
options (``--use_peft``, ``--lora_r``, ``--dtype``, ``--load_in_4bit``, ...) and a
YAML ``--config`` file are accepted.

Data (``--dataset_name``): a Hugging Face Hub dataset name, a local ``.json`` /
``.jsonl`` / ``.csv`` / ``.parquet`` file, or a directory written by
``Dataset.save_to_disk``. Rows are either preference rows (``prompt``, ``chosen``,
``rejected``) for ``--paired True`` or ``False``, or KTO rows (``prompt``,
``completion``, boolean ``label``) for ``--paired False``.

Examples:
    # paired AOT with LoRA (the reference is the model with its adapters disabled)
    python integrations/examples/train_aot_trl.py \\
        --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct \\
        --dataset_name trl-lib/ultrafeedback_binarized \\
        --output_dir aot-qwen --paired True --beta 0.01 --use_peft

    # unpaired AOT on KTO-format data with a hinge cost and soft sort
    python integrations/examples/train_aot_trl.py \\
        --model_name_or_path path/to/model --dataset_name data.jsonl --output_dir out \\
        --paired False --cost squared_hinge --sort soft --precompute_ref_log_probs True

Without CUDA, bf16 is off unless ``--bf16`` is given.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from datasets import DatasetDict, load_dataset, load_from_disk
from otloss.integrations.trl import AOTConfig, AOTTrainer
from transformers import AutoTokenizer
from trl import ModelConfig, ScriptArguments, TrlParser, get_peft_config, get_quantization_config

_FILE_FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def load_data(name: str, config: str | None, split: str):
    """A split from a local file, a ``save_to_disk`` directory or a Hub dataset."""
    path = Path(name)
    if path.is_dir():
        data = load_from_disk(str(path))
        return data[split] if isinstance(data, DatasetDict) else data
    if path.is_file():
        fmt = _FILE_FORMATS.get(path.suffix)
        if fmt is None:
            raise ValueError(f"unsupported data file {path}: use one of {sorted(_FILE_FORMATS)}")
        return load_dataset(fmt, data_files=str(path), split="train")
    return load_dataset(name, config, split=split)


def main(argv: list[str] | None = None) -> dict[str, float]:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not torch.cuda.is_available() and not any(a.startswith("--bf16") for a in argv):
        argv += ["--bf16", "False"]
    parser = TrlParser((ScriptArguments, AOTConfig, ModelConfig))
    script_args, training_args, model_args = parser.parse_args_and_config(argv)
    if script_args.dataset_name is None:
        parser.error("--dataset_name is required")

    tokenizer = AutoTokenizer.from_pretrained(
        model_args.model_name_or_path,
        revision=model_args.model_revision,
        trust_remote_code=training_args.trust_remote_code,
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # The trainer loads the model (and, when needed, the reference copy) from the path with these options.
    training_args.model_init_kwargs = {
        "revision": model_args.model_revision,
        "trust_remote_code": training_args.trust_remote_code,
        "attn_implementation": model_args.attn_implementation,
        "dtype": model_args.dtype,
        **(training_args.model_init_kwargs or {}),
    }

    train = load_data(script_args.dataset_name, script_args.dataset_config, script_args.dataset_train_split)
    evaluate = training_args.eval_strategy != "no"
    eval_data = (
        load_data(script_args.dataset_name, script_args.dataset_config, script_args.dataset_test_split)
        if evaluate
        else None
    )

    # Reference: with PEFT, the model with adapters disabled; with --precompute_ref_log_probs, the initial
    # model's log-probabilities; otherwise TRL loads a second copy from --model_name_or_path.
    trainer = AOTTrainer(
        model_args.model_name_or_path,
        args=training_args,
        train_dataset=train,
        eval_dataset=eval_data,
        processing_class=tokenizer,
        quantization_config=get_quantization_config(model_args),
        peft_config=get_peft_config(model_args),  # None without --use_peft
    )
    result = trainer.train()
    metrics = {**result.metrics, "global_step": trainer.state.global_step}
    trainer.save_model(training_args.output_dir)
    trainer.save_metrics("train", metrics)
    if evaluate:
        trainer.save_metrics("eval", trainer.evaluate())
    trainer.accelerator.wait_for_everyone()
    trainer.accelerator.end_training()  # destroys the process group: no collective left running at exit
    return metrics


if __name__ == "__main__":
    main()

"""Align a causal LM with AOT under PyTorch Lightning.

Install from a checkout with ``pip install -e ".[lightning]"`` (or ``pip install "torch-otloss[lightning]"``).

Offline smoke run (a two-layer model and a word-level tokenizer built in code, a
toy preference set; well under a minute on a CPU)::

    python integrations/examples/train_aot_lightning.py --max-steps 20

A real model and your data (a JSONL file of ``{"prompt", "chosen", "rejected"}``,
or ``{"prompt", "completion", "label"}`` with ``--unpaired``)::

    python integrations/examples/train_aot_lightning.py --model Qwen/Qwen2.5-0.5B \\
        --data prefs.jsonl --accelerator gpu --devices 4 --strategy ddp \\
        --precision bf16-mixed --batch-size 8 --lr 5e-5 --max-epochs 1

By default the policy is the model with LoRA adapters (``--no-lora`` trains every
weight against a frozen copy). Outputs under ``--output-dir``: ``logs/`` (CSV
metrics), ``checkpoints/`` (last checkpoint; resume with ``--resume``) and
``aot_quantiles/`` (quantile plots after each validation).
"""

from __future__ import annotations

import argparse
import copy
import json
import random
from pathlib import Path

TOY_WORDS = "the a cat dog sat ran on mat log tree is was big small red blue why how".split()
GOOD_WORDS = "good great yes thanks please happy".split()
BAD_WORDS = "bad awful no never sad angry".split()
SPECIAL = ["<pad>", "<s>", "</s>", "<unk>"]


def tiny_tokenizer():
    """A word-level ``PreTrainedTokenizerFast`` built in code (BOS added to prompts)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIAL + TOY_WORDS + GOOD_WORDS + BAD_WORDS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def tiny_model(seed: int = 0):
    """The tiny two-layer ``LlamaForCausalLM`` of the tests (:func:`otloss.integrations._common.tiny_causal_lm`)."""
    from otloss.integrations._common import tiny_causal_lm

    return tiny_causal_lm(seed)


def toy_data(n: int, *, paired: bool = True, seed: int = 0) -> list[dict]:
    """Toy preferences: chosen completions use GOOD_WORDS, rejected ones BAD_WORDS."""
    rng = random.Random(seed)

    def words(pool: list[str], lo: int, hi: int) -> str:
        return " ".join(rng.choice(pool) for _ in range(rng.randint(lo, hi)))

    rows = []
    for i in range(n):
        prompt = words(TOY_WORDS, 2, 5)
        if paired:
            rows.append({"prompt": prompt, "chosen": words(GOOD_WORDS, 1, 4), "rejected": words(BAD_WORDS, 1, 4)})
        else:
            label = i % 3 != 2  # twice as many desirable as undesirable samples
            rows.append(
                {"prompt": prompt, "completion": words(GOOD_WORDS if label else BAD_WORDS, 1, 4), "label": label}
            )
    return rows


def read_jsonl(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny", help="'tiny' (built in code) or a Hugging Face model name / path")
    p.add_argument("--data", default=None, help="JSONL examples; default: a toy set built in code")
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument("--unpaired", action="store_true", help="unpaired AOT on {prompt, completion, label} data")
    p.add_argument("--no-lora", action="store_true", help="train all weights against a frozen copy")
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--lora-alpha", type=int, default=None, help="default 2 * lora-r")
    p.add_argument("--lora-dropout", type=float, default=0.0)
    p.add_argument("--lora-target-modules", default="all-linear")
    p.add_argument("--cost", default="logistic", choices=["logistic", "hinge", "squared_hinge", "least_squares"])
    p.add_argument("--beta", type=float, default=None, help="default 0.01 (the paper's value)")
    p.add_argument("--sort", default="hard", choices=["hard", "soft"])
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=None)
    p.add_argument("--max-prompt-length", type=int, default=None)
    p.add_argument("--max-steps", type=int, default=-1)
    p.add_argument("--max-epochs", type=int, default=3)
    p.add_argument("--accelerator", default="cpu")
    p.add_argument("--devices", type=int, default=1)
    p.add_argument(
        "--strategy",
        default="auto",
        help="a Lightning strategy name (auto, ddp, fsdp, ...) or 'fsdp2': ModelParallelStrategy, every device data-parallel",
    )
    p.add_argument("--global-batch", action="store_true", help="sort the batches of all ranks together")
    p.add_argument("--accumulate-grad-batches", type=int, default=1)
    p.add_argument(
        "--accumulate-quantiles",
        action="store_true",
        help="sort each micro-batch with the earlier ones of its optimizer step",
    )
    p.add_argument("--activation-checkpointing", action="store_true", help="the model's gradient checkpointing")
    p.add_argument("--precision", default="32-true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-dir", default="aot_lightning_out")
    p.add_argument("--resume", default=None, help="checkpoint path to resume from")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger
    from otloss.integrations.lightning import AOTAlignmentModule, AOTDataModule, QuantilePlotCallback

    pl.seed_everything(args.seed, workers=True)
    paired = not args.unpaired
    if args.model == "tiny":
        model, tokenizer = tiny_model(args.seed), tiny_tokenizer()
        rows = read_jsonl(args.data) if args.data else toy_data(160, paired=paired, seed=args.seed)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(args.model)
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        if args.data is None:
            raise SystemExit("--data is required with a real model")
        rows = read_jsonl(args.data)
    random.Random(args.seed).shuffle(rows)
    n_val = int(len(rows) * args.val_fraction)
    train_rows, val_rows = rows[n_val:], (rows[:n_val] or None)

    ref_model = None
    if args.no_lora:
        ref_model = copy.deepcopy(model)
    else:
        from peft import LoraConfig, get_peft_model

        targets = args.lora_target_modules
        targets = targets if targets == "all-linear" else targets.split(",")
        alpha = 2 * args.lora_r if args.lora_alpha is None else args.lora_alpha
        config = LoraConfig(r=args.lora_r, lora_alpha=alpha, lora_dropout=args.lora_dropout, target_modules=targets)
        model = get_peft_model(model, config)
    if args.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    module = AOTAlignmentModule(
        model,
        ref_model=ref_model,
        paired=paired,
        cost=args.cost,
        beta=args.beta,
        sort=args.sort,
        lr=args.lr,
        global_batch=args.global_batch,
        accumulate_quantiles=args.accumulate_quantiles,
    )
    data = AOTDataModule(
        tokenizer,
        train_rows,
        val_rows,
        paired=paired,
        batch_size=args.batch_size,
        max_length=args.max_length,
        max_prompt_length=args.max_prompt_length,
        seed=args.seed,
    )
    out = Path(args.output_dir)
    plots = QuantilePlotCallback(out / "aot_quantiles")
    strategy = args.strategy
    if strategy == "fsdp2":
        from lightning.pytorch.strategies import ModelParallelStrategy

        strategy = ModelParallelStrategy(data_parallel_size=args.devices, tensor_parallel_size=1)
    trainer = pl.Trainer(
        accelerator=args.accelerator,
        devices=args.devices,
        strategy=strategy,
        accumulate_grad_batches=args.accumulate_grad_batches,
        precision=args.precision,
        max_steps=args.max_steps,
        max_epochs=args.max_epochs,
        default_root_dir=out,
        logger=CSVLogger(out, name="logs"),
        callbacks=[plots, ModelCheckpoint(out / "checkpoints", save_last=True, save_top_k=0)],
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=data, ckpt_path=args.resume)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    summary = {
        "world_size": trainer.world_size,
        "global_step": trainer.global_step,
        "metrics": metrics,
        "plots": [str(p) for p in plots.paths],
    }
    if trainer.is_global_zero:
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        print(json.dumps({k: summary[k] for k in ("world_size", "global_step")} | {"metrics": metrics}, indent=2))
    return summary


if __name__ == "__main__":
    main()

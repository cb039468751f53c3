"""The 7B recipe (``integrations/recipes/``): its files parse, and they launch the TRL example.

* The accelerate configs (``fsdp2_8gpu.yaml``, ``cpu_2proc.yaml``) load with
  ``yaml.safe_load`` and with accelerate's own config loader and hold the documented
  settings; the FSDP2 settings build accelerate's ``FullyShardedDataParallelPlugin``,
  whose transformer auto-wrap policy selects the decoder layers of a LoRA-wrapped model.
* The training configs (``aot_7b_paired.yaml``, ``aot_7b_unpaired.yaml``) parse with the
  example's own ``TrlParser`` and hold the paper's AOT settings.
* ``accelerate launch`` with ``cpu_2proc.yaml`` (and with ``fsdp2_8gpu.yaml`` overridden
  to two processes without mixed precision) runs ``integrations/examples/train_aot_trl.py
  --config aot_7b_<paired|unpaired>.yaml`` on a tiny model saved in a temporary
  directory, with the overrides a tiny CPU run needs, two CPU processes, for 3 steps,
  offline. On CPU accelerate runs its processes as MULTI_CPU (gloo, gradients averaged
  as in DDP): FSDP itself needs GPUs there. The tests check the exit code, the files the
  script writes, and that the two processes split the data (the epoch fraction reached
  after 3 steps is that of a world size of 2).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import random
import sys
from pathlib import Path

import pytest
from helpers import run_process

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "integrations" / "recipes"
GPU_CONFIG = RECIPES / "fsdp2_8gpu.yaml"
CPU_CONFIG = RECIPES / "cpu_2proc.yaml"
SCRIPT = ROOT / "integrations" / "examples" / "train_aot_trl.py"
N_ROWS, PER_DEVICE, STEPS, WORLD = 64, 4, 3, 2
TRAIN_CONFIGS = {"paired": RECIPES / "aot_7b_paired.yaml", "unpaired": RECIPES / "aot_7b_unpaired.yaml"}
LORA_TARGETS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def _load(path: Path) -> dict:
    with path.open() as f:
        return yaml.safe_load(f)


def _tiny_helpers():
    """The tiny model/tokenizer builders of ``tests/integrations/conftest.py``."""
    spec = importlib.util.spec_from_file_location("_tiny_integration_helpers", ROOT / "tests/integrations/conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------
# The YAML files
# ---------------------------------------------------------------------------


def test_fsdp2_8gpu_config_holds_the_documented_settings():
    cfg = _load(GPU_CONFIG)
    assert cfg["distributed_type"] == "FSDP"
    assert cfg["mixed_precision"] == "bf16"
    assert cfg["num_processes"] == 8 and cfg["num_machines"] == 1
    assert cfg["use_cpu"] is False
    fsdp = cfg["fsdp_config"]
    assert fsdp["fsdp_version"] == 2
    assert fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert fsdp["fsdp_activation_checkpointing"] is True
    assert fsdp["fsdp_reshard_after_forward"] is True
    assert fsdp["fsdp_offload_params"] is False
    assert fsdp["fsdp_state_dict_type"] == "FULL_STATE_DICT"


def test_cpu_2proc_config_holds_the_documented_settings():
    cfg = _load(CPU_CONFIG)
    assert cfg["use_cpu"] is True
    assert cfg["num_processes"] == WORLD and cfg["num_machines"] == 1
    assert cfg["mixed_precision"] == "no"
    # MULTI_GPU selects accelerate's torchrun launcher (MULTI_CPU would need mpirun to start several processes).
    assert cfg["distributed_type"] == "MULTI_GPU"
    assert "fsdp_config" not in cfg


@pytest.mark.parametrize("path", [GPU_CONFIG, CPU_CONFIG], ids=lambda p: p.name)
def test_accelerate_loads_the_config(path):
    config_args = pytest.importorskip("accelerate.commands.config.config_args")
    loaded = config_args.load_config_from_file(str(path))
    raw = _load(path)
    assert loaded.num_processes == raw["num_processes"]
    assert loaded.distributed_type.value == raw["distributed_type"]
    assert loaded.use_cpu == raw["use_cpu"]
    assert (loaded.fsdp_config or {}) == raw.get("fsdp_config", {})


def test_fsdp2_settings_build_the_plugin_and_wrap_the_decoder_layers():
    accelerate = pytest.importorskip("accelerate")
    peft = pytest.importorskip("peft")
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy

    fsdp = _load(GPU_CONFIG)["fsdp_config"]
    plugin = accelerate.FullyShardedDataParallelPlugin(
        fsdp_version=fsdp["fsdp_version"],
        auto_wrap_policy=fsdp["fsdp_auto_wrap_policy"].lower(),
        reshard_after_forward=fsdp["fsdp_reshard_after_forward"],
        state_dict_type=fsdp["fsdp_state_dict_type"],
        activation_checkpointing=fsdp["fsdp_activation_checkpointing"],
        cpu_ram_efficient_loading=fsdp["fsdp_cpu_ram_efficient_loading"],
    )
    assert plugin.fsdp_version == 2 and plugin.activation_checkpointing
    model = peft.get_peft_model(_tiny_helpers()._build_model(0), peft.LoraConfig(r=4, target_modules="all-linear"))
    plugin.set_auto_wrap_policy(model)  # no class named: read from the model's _no_split_modules
    wraps = fsdp2_prepare_auto_wrap_policy(plugin, model)
    wrapped = [name for name, module in model.named_modules() if wraps(module)]
    assert wrapped == ["base_model.model.model.layers.0", "base_model.model.model.layers.1"]


@pytest.mark.parametrize("data", ["paired", "unpaired"])
def test_training_config_parses_with_the_example_parser(data):
    """The script's own parser (TrlParser over ScriptArguments, AOTConfig, ModelConfig) reads the recipe."""
    trl = pytest.importorskip("trl")
    from otloss.integrations.trl import AOTConfig

    parser = trl.TrlParser((trl.ScriptArguments, AOTConfig, trl.ModelConfig))
    # --use_cpu: bf16 is refused at parse time on a machine without a GPU unless the run is declared CPU-only
    script, train, model = parser.parse_args_and_config(["--config", str(TRAIN_CONFIGS[data]), "--use_cpu", "True"])
    assert train.paired is (data == "paired")
    assert train.loss_type == ["aot" if data == "paired" else "aot_unpaired"]
    assert train.beta == 0.01 and train.cost == "logistic" and train.sort == "hard"
    assert train.global_batch is True
    assert train.bf16 is True and model.dtype == "bfloat16"
    assert train.activation_checkpointing is False  # FSDP's activation checkpointing is on in fsdp2_8gpu.yaml
    assert (train.per_device_train_batch_size, train.gradient_accumulation_steps) == (8, 2)
    assert model.use_peft and model.lora_target_modules == "all-linear"
    assert (model.lora_r, model.lora_alpha) == (16, 16)
    assert script.dataset_train_split == "train_prefs"


# ---------------------------------------------------------------------------
# Launching the TRL example on two CPU processes
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run_inputs(tmp_path_factory) -> dict[str, Path]:
    """A saved tiny model + tokenizer, and paired and KTO-format JSONL data."""
    pytest.importorskip("trl")
    helpers = _tiny_helpers()
    root = tmp_path_factory.mktemp("recipe")
    model_dir = root / "model"
    helpers._build_model(0).save_pretrained(model_dir)
    helpers._build_tokenizer().save_pretrained(model_dir)
    rng = random.Random(0)
    paired, unpaired = root / "prefs.jsonl", root / "kto.jsonl"
    with paired.open("w") as f:
        for _ in range(N_ROWS):
            row = {
                "prompt": helpers._sentence(rng, rng.randint(2, 4)),
                "chosen": " " + helpers._sentence(rng, rng.randint(2, 5)),
                "rejected": " " + helpers._sentence(rng, rng.randint(2, 5)),
            }
            f.write(json.dumps(row) + "\n")
    with unpaired.open("w") as f:
        for i in range(N_ROWS):
            row = {
                "prompt": helpers._sentence(rng, rng.randint(2, 4)),
                "completion": " " + helpers._sentence(rng, rng.randint(2, 5)),
                "label": i % 3 != 0,
            }
            f.write(json.dumps(row) + "\n")
    return {"root": root, "model": model_dir, "paired": paired, "unpaired": unpaired}


def _launch(config: Path, inputs: dict[str, Path], out: Path, data: str, launch_args: list[str] = ()):
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_CACHE": str(inputs["root"] / "datasets_cache"),
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), *launch_args,
        str(SCRIPT),
        "--config", str(TRAIN_CONFIGS[data]),
        # the recipe's values, except what a tiny CPU run needs
        "--use_cpu", "True",
        "--model_name_or_path", str(inputs["model"]),
        "--dtype", "float32",
        "--dataset_name", str(inputs[data]),
        "--output_dir", str(out),
        "--per_device_train_batch_size", str(PER_DEVICE),
        "--max_steps", str(STEPS),
        "--max_length", "32",
        "--logging_steps", "1",
        "--save_strategy", "no",
    ]  # fmt: skip
    # about 15 s on a 2-core CPU; a hang prints every process's stacks and gets one more try
    return run_process(cmd, cwd=ROOT, env=env, timeout=150, attempts=2)


def _check_output(out: Path) -> dict:
    for name in ("adapter_config.json", "adapter_model.safetensors", "train_results.json", "all_results.json"):
        assert (out / name).is_file(), f"{name} missing from {sorted(p.name for p in out.iterdir())}"
    adapter = json.loads((out / "adapter_config.json").read_text())
    targets = adapter["target_modules"]  # "all-linear" resolved to module names: every projection of both layers
    assert {t.rsplit(".", 1)[-1] for t in targets} == LORA_TARGETS and len(targets) == 2 * len(LORA_TARGETS)
    results = json.loads((out / "train_results.json").read_text())
    assert results["global_step"] == STEPS
    # Each optimizer step takes PER_DEVICE rows x grad_accum micro-batches on each of the two processes:
    # one process alone would be at half this epoch fraction.
    accum = _load(TRAIN_CONFIGS["paired"])["gradient_accumulation_steps"]
    assert results["epoch"] == pytest.approx(STEPS * PER_DEVICE * accum * WORLD / N_ROWS)
    assert math.isfinite(results["train_loss"]) and results["train_loss"] > 0
    return results


@pytest.mark.distributed
@pytest.mark.parametrize("data", ["paired", "unpaired"])
def test_cpu_config_launches_the_trl_example(tiny_run_inputs, tmp_path, data):
    out = tmp_path / f"out_{data}"
    _launch(CPU_CONFIG, tiny_run_inputs, out, data)
    _check_output(out)


@pytest.mark.distributed
def test_gpu_config_launches_on_cpu_with_two_processes(tiny_run_inputs, tmp_path):
    """The 8-GPU file itself goes through the launcher (overridden to 2 processes, no bf16; MULTI_CPU on CPU)."""
    out = tmp_path / "out_gpu_config"
    _launch(GPU_CONFIG, tiny_run_inputs, out, "paired", ["--num_processes", str(WORLD), "--mixed_precision", "no"])
    _check_output(out)

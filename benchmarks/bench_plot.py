"""PLOT's extra time per training step: a tiny causal LM trained with DPO, with and without the PLOT term.

The model is a Llama built from a config (no download): ``--layers`` decoder layers, hidden size
``--hidden``, vocabulary ``--vocab``. A step is what a DPO trainer does with precomputed reference
log-probabilities: one forward of the policy on the chosen and rejected sequences together
(``[2 * pairs, seq_len]``, the first ``--prompt`` tokens of each labelled ``-100``), the loss,
the backward pass and an AdamW step. Precomputed reference log-probabilities make the step the
smallest a DPO step can be, so the relative overhead reported is the largest.

Variants (each trains its own copy of the same initial model):

* ``dpo``: DPO from the sequence log-probabilities (``log_softmax`` + ``gather``, as TRL computes
  them), ``beta = 0.1``. The baseline.
* ``dpo+plot_sequence``: the same loss plus ``otloss.plot_loss(..., base=None, mode="sequence")``
  (the default PLOT term: entropic OT, cosine cost, ``epsilon = 0.05``, the model's input
  embeddings), ``alpha = 1``.
* ``dpo+plot_position``: the same with ``mode="position"`` (closed form, no Sinkhorn).
* ``plot_dpo``: ``otloss.plot_loss(..., base="dpo")`` alone, whose policy log-probabilities come
  from the same pass over the vocabulary as the PLOT term (no separate ``log_softmax``).

Timing: after ``--warmup`` rounds, each of ``--steps`` rounds runs one step of every variant, in
an order shuffled per round, so that all variants see the same machine load. Reported per variant:
the median step time with its 20th and 80th percentiles, ``overhead_pct`` (the variant's median
over the baseline's, minus one) and ``extra_ms_p50`` (the median of the per-round differences to
the baseline), in wall time, and the same in process CPU time (``cpu_*`` columns). With one torch
thread on a machine shared with other jobs, CPU time is the steadier measure: time spent
descheduled is not counted.

Components (same run, same shapes, on the logits of a step, forward + backward): the model's own
forward and backward (``model``), the soft-embedding pass alone (``soft_pass``:
``token_ot_loss(mode="position")`` on chosen and rejected), the whole sequence-mode term
(``plot_sequence_term``) and ``entropic_ot`` alone on costs of the sequence-mode shape
(``sinkhorn``). They say what the overhead is made of.

Rows are appended to ``benchmarks/results/plot_step.csv`` with the run time, commit, device and
versions::

    python benchmarks/bench_plot.py                 # the CPU defaults: 20 timed rounds
    python benchmarks/bench_plot.py --steps 40 --vocab 8192
    python benchmarks/bench_plot.py --quick         # a smoke run (tiny sizes, 3 rounds)
    python benchmarks/bench_plot.py --summarize     # Markdown table of the latest run in the CSV
    python benchmarks/bench_plot.py --memory        # peak memory at vocab 128k, 1024 positions

``--memory`` measures instead the peak resident-memory growth of one forward and backward of
``token_ot_loss`` on ``[1, 1024, 131072]`` float32 logits, each method in a fresh process, against
the plain autograd formula; rows go to ``benchmarks/results/plot_memory.csv``.
"""

from __future__ import annotations

import argparse
import copy
import csv
import datetime as dt
import random
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from provenance import append_csv
from provenance import commit as _commit
from provenance import device_name as _device_name
from provenance import version as _version

import otloss

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "plot_step.csv"
BASELINE = "dpo"
VARIANTS = ("dpo", "dpo+plot_sequence", "dpo+plot_position", "plot_dpo")
COLUMNS = [
    "time", "commit", "device", "threads", "torch", "transformers", "pot", "kind", "variant", "layers", "hidden",
    "vocab", "pairs", "seq_len", "prompt", "rounds", "ms_p50", "ms_p20", "ms_p80", "overhead_pct", "extra_ms_p50",
    "cpu_ms_p50", "cpu_ms_p20", "cpu_ms_p80", "cpu_overhead_pct",
]  # fmt: skip


def build_model(args: argparse.Namespace) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=2 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=max(1, args.hidden // 64),
        num_key_value_heads=max(1, args.hidden // 64),
        max_position_embeddings=args.seq_len,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def make_batch(args: argparse.Namespace) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    B, T = args.pairs, args.seq_len
    ids = torch.randint(0, args.vocab, (2 * B, T), generator=g)
    ids[B:, : args.prompt] = ids[:B, : args.prompt]  # chosen and rejected share their prompt
    labels = ids[:, 1:].clone()
    labels[:, : args.prompt - 1] = -100
    labels[B // 2 :: B, -8:] = -100  # some padding at the end of a few sequences
    ref = -torch.rand(2 * B, generator=g) * 10 - 5 * T
    return {"input_ids": ids, "labels": labels, "ref_chosen": ref[:B], "ref_rejected": ref[B:]}


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """TRL's way: ``log_softmax`` over the vocabulary, ``gather`` at the labels, sum over counted positions."""
    mask = labels != -100
    lp = logits.log_softmax(-1).gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return (lp * mask).sum(-1)


def step_fn(variant: str, model: torch.nn.Module, opt: torch.optim.Optimizer, batch: dict) -> Callable[[], float]:
    B = batch["ref_chosen"].shape[0]
    labels = batch["labels"]

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        logits = model(input_ids=batch["input_ids"]).logits[:, :-1]  # [2B, T-1, V], a view
        E = model.get_input_embeddings().weight
        c_logits, r_logits, c_labels, r_labels = logits[:B], logits[B:], labels[:B], labels[B:]
        if variant == "plot_dpo":
            loss = otloss.plot_loss(
                c_logits,
                c_labels,
                r_logits,
                r_labels,
                E,
                ref_chosen_logps=batch["ref_chosen"],
                ref_rejected_logps=batch["ref_rejected"],
                base="dpo",
            )
        else:
            logps = sequence_logps(logits, labels)
            margin = (logps[:B] - batch["ref_chosen"]) - (logps[B:] - batch["ref_rejected"])
            loss = -F.logsigmoid(0.1 * margin).mean()
            if variant != "dpo":
                mode = variant.rsplit("_", 1)[1]
                loss = loss + otloss.plot_loss(c_logits, c_labels, r_logits, r_labels, E, base=None, mode=mode)
        loss.backward()
        opt.step()
        return float(loss.detach())

    return step


def _percentiles(xs: list[float]) -> tuple[float, float, float]:
    a = np.asarray(xs) * 1e3
    return float(np.median(a)), float(np.percentile(a, 20)), float(np.percentile(a, 80))


def _time(fn: Callable[[], object]) -> tuple[float, float]:
    """Wall and process CPU seconds of one call."""
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0


def components(args: argparse.Namespace, model: torch.nn.Module, batch: dict, rounds: int) -> dict[str, list[float]]:
    """Forward + backward of the pieces, interleaved per round like the steps."""
    B = args.pairs
    labels = batch["labels"]
    model = copy.deepcopy(model)
    E = model.get_input_embeddings().weight.detach()
    with torch.no_grad():
        logits0 = model(input_ids=batch["input_ids"]).logits[:, :-1].contiguous()
    n = int((labels[:B] != -100).sum(1).max())
    cost = (
        1 - F.normalize(torch.randn(B, n, args.hidden), dim=-1) @ F.normalize(torch.randn(B, n, args.hidden), dim=-1).mT
    )

    def model_fb():
        model.zero_grad(set_to_none=True)
        out = model(input_ids=batch["input_ids"]).logits
        out.sum().backward()

    def term(mode):
        def run():
            lg = logits0.detach().requires_grad_(True)
            loss = otloss.plot_loss(lg[:B], labels[:B], lg[B:], labels[B:], E, base=None, mode=mode)
            loss.backward()

        return run

    def sinkhorn():
        c = cost.detach().requires_grad_(True)
        otloss.entropic_ot(torch.cat([c, c]), epsilon=0.05).sum().backward()  # chosen and rejected: 2B problems

    fns = {
        "model": model_fb,
        "soft_pass": term("position"),
        "plot_sequence_term": term("sequence"),
        "sinkhorn": sinkhorn,
    }
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(args.warmup):
        for fn in fns.values():
            fn()
    for _ in range(rounds):
        for name in random.sample(list(fns), len(fns)):
            times[name].append(_time(fns[name]))
    return times


def run(args: argparse.Namespace) -> list[dict]:
    torch.set_num_threads(args.threads)
    random.seed(0)
    base_model = build_model(args)
    batch = make_batch(args)
    steps = {}
    for v in args.variants:
        model = copy.deepcopy(base_model)
        steps[v] = step_fn(v, model, torch.optim.AdamW(model.parameters(), lr=1e-4), batch)
    for _ in range(args.warmup):
        for v in args.variants:
            steps[v]()
    times: dict[str, list[float]] = {v: [] for v in args.variants}
    for _ in range(args.steps):
        for v in random.sample(list(args.variants), len(args.variants)):
            times[v].append(_time(steps[v]))
    comp = components(args, base_model, batch, args.steps)

    meta = {
        "time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "commit": _commit("otloss", "benchmarks/bench_plot.py"),
        "device": _device_name(threads=False),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "pot": _version("ot"),
        "layers": args.layers,
        "hidden": args.hidden,
        "vocab": args.vocab,
        "pairs": args.pairs,
        "seq_len": args.seq_len,
        "prompt": args.prompt,
        "rounds": args.steps,
    }
    rows = []
    base = [w for w, _ in times[BASELINE]]
    base_cpu = [c for _, c in times[BASELINE]]
    for v, wc in times.items():
        ts, cs = [w for w, _ in wc], [c for _, c in wc]
        p50, p20, p80 = _percentiles(ts)
        c50, c20, c80 = _percentiles(cs)
        diffs = [t - b for t, b in zip(ts, base)]
        rows.append(
            meta
            | {
                "kind": "step",
                "variant": v,
                "ms_p50": p50,
                "ms_p20": p20,
                "ms_p80": p80,
                "overhead_pct": 100 * (np.median(ts) / np.median(base) - 1),
                "extra_ms_p50": float(np.median(diffs)) * 1e3,
                "cpu_ms_p50": c50,
                "cpu_ms_p20": c20,
                "cpu_ms_p80": c80,
                "cpu_overhead_pct": 100 * (np.median(cs) / np.median(base_cpu) - 1),
            }
        )
    for name, wc in comp.items():
        p50, p20, p80 = _percentiles([w for w, _ in wc])
        c50, c20, c80 = _percentiles([c for _, c in wc])
        rows.append(meta | {"kind": "component", "variant": name, "ms_p50": p50, "ms_p20": p20, "ms_p80": p80,
                            "overhead_pct": "", "extra_ms_p50": "", "cpu_ms_p50": c50, "cpu_ms_p20": c20,
                            "cpu_ms_p80": c80, "cpu_overhead_pct": ""})  # fmt: skip
    return rows


def write_csv(rows: list[dict], path: Path) -> None:
    append_csv(rows, path, COLUMNS)


def summarize(path: Path) -> str:
    """A Markdown table of the latest run in the CSV."""
    with open(path) as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise SystemExit(f"{path} has no rows")
    last = rows[-1]["time"]
    rows = [r for r in rows if r["time"] == last]
    r0 = rows[0]
    lines = [
        f"{r0['device']}, {r0['threads']} thread(s), torch {r0['torch']}, commit {r0['commit']}; "
        f"Llama {r0['layers']} layers, hidden {r0['hidden']}, vocab {r0['vocab']}, {r0['pairs']} pairs x "
        f"{r0['seq_len']} tokens (prompt {r0['prompt']}), {r0['rounds']} rounds",
        "",
        "| kind | variant | wall ms p50 | p20-p80 | overhead | extra ms (paired p50) | CPU ms p50 | p20-p80 "
        "| CPU overhead |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        over = f"{float(r['overhead_pct']):+.1f}%" if r["overhead_pct"] else ""
        extra = f"{float(r['extra_ms_p50']):.1f}" if r["extra_ms_p50"] else ""
        cpu = (
            f"{float(r['cpu_ms_p50']):.1f} | {float(r['cpu_ms_p20']):.1f}-{float(r['cpu_ms_p80']):.1f}"
            if r.get("cpu_ms_p50")
            else " | "
        )
        cpu_over = f"{float(r['cpu_overhead_pct']):+.1f}%" if r.get("cpu_overhead_pct") else ""
        lines.append(
            f"| {r['kind']} | {r['variant']} | {float(r['ms_p50']):.1f} | "
            f"{float(r['ms_p20']):.1f}-{float(r['ms_p80']):.1f} | {over} | {extra} | {cpu} | {cpu_over} |"
        )
    return "\n".join(lines)


MEMORY_OUT = ROOT / "benchmarks" / "results" / "plot_memory.csv"
MEMORY_COLUMNS = ["time", "commit", "device", "torch", "method", "batch", "seq_len", "vocab", "dim", "logits_mib",
                  "peak_growth_mib", "extra_mib", "seconds"]  # fmt: skip
_MEMORY_CHILD = """
import resource, sys, time, torch, torch.nn.functional as F, otloss
torch.set_num_threads(1)
method, B, T, V, D = sys.argv[1], *map(int, sys.argv[2:])
g = torch.Generator().manual_seed(0)
logits = torch.randn(B, T, V, generator=g).requires_grad_(True)
labels = torch.randint(0, V, (B, T), generator=g)
E = torch.randn(V, D, generator=g)
rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
def run(logits, labels, E):
    if method == "plain_position":
        En = F.normalize(E, dim=-1)
        loss = (1 - ((logits.softmax(-1) @ En) * En[labels]).sum(-1)).mean()
    else:
        loss = otloss.token_ot_loss(logits, labels, E, mode=method.split("_")[1])
    loss.backward()
run(logits[:, :4, :64].detach().requires_grad_(True), labels[:, :4] % 64, E[:64])  # imports (POT) before measuring
r0, t0 = rss(), time.perf_counter()
run(logits, labels, E)
print(rss() - r0, time.perf_counter() - t0)
"""


def memory(args: argparse.Namespace) -> list[dict]:
    """Peak resident-memory growth of forward + backward, each method in a fresh process (Linux ``ru_maxrss``).

    The growth includes the gradient of the logits (as large as the logits); ``extra_mib`` is what
    remains beyond it. ``plain_position`` is the position-mode formula written with autograd
    (``softmax(logits) @ E_hat``), which saves the ``[B, T, V]`` softmax.
    """
    B, T, V, D = 1, args.memory_seq_len, args.memory_vocab, 64
    logits_mib = B * T * V * 4 / 2**20
    meta = {"time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "commit": _commit("otloss", "benchmarks/bench_plot.py"),
            "device": _device_name(threads=False), "torch": torch.__version__}  # fmt: skip
    rows = []
    for method in ("otloss_position", "otloss_sequence", "plain_position"):
        out = subprocess.run(
            [sys.executable, "-c", _MEMORY_CHILD, method, str(B), str(T), str(V), str(D)],
            capture_output=True, text=True, check=True, cwd=ROOT,
        )  # fmt: skip
        growth, seconds = map(float, out.stdout.split()[-2:])
        rows.append(meta | {"method": method, "batch": B, "seq_len": T, "vocab": V, "dim": D,
                            "logits_mib": logits_mib, "peak_growth_mib": growth,
                            "extra_mib": growth - logits_mib, "seconds": seconds})  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="CSV file to append to")
    parser.add_argument("--steps", type=int, default=20, help="timed rounds (one step of every variant each)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--pairs", type=int, default=4, help="preference pairs per step")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (prompt + response)")
    parser.add_argument("--prompt", type=int, default=32, help="prompt tokens (labelled -100)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the shared CPU has 2 cores)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--quick", action="store_true", help="a smoke run: tiny model, 3 rounds")
    parser.add_argument("--summarize", action="store_true", help="print the latest run in --out as Markdown")
    parser.add_argument(
        "--memory", action="store_true", help="measure peak memory instead (appends to plot_memory.csv)"
    )
    parser.add_argument("--memory-vocab", type=int, default=128 * 1024)
    parser.add_argument("--memory-seq-len", type=int, default=1024)
    args = parser.parse_args(argv)
    if args.memory:
        rows = memory(args)
        append_csv(rows, MEMORY_OUT, MEMORY_COLUMNS)
        for row in rows:
            print(f"{row['method']}: peak growth {row['peak_growth_mib']:.0f} MiB for {row['logits_mib']:.0f} MiB "
                  f"of logits (extra beyond their gradient {row['extra_mib']:.0f} MiB), {row['seconds']:.1f} s")  # fmt: skip
        return 0
    if args.summarize:
        print(summarize(args.out))
        return 0
    if BASELINE not in args.variants:
        args.variants = [BASELINE, *args.variants]
    if args.quick:
        args.steps, args.warmup, args.vocab, args.hidden, args.seq_len, args.prompt = 3, 1, 256, 64, 24, 8
    start = time.perf_counter()
    rows = run(args)
    write_csv(rows, args.out)
    print(summarize(args.out))
    print(f"{len(rows)} rows appended to {args.out} in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

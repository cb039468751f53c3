"""The demo pipeline: scorer, reference GPT, preference data, alignment, evaluation, report."""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import pickle
import platform
import sys
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import otloss

from .data import load_reviews
from .losses import METHODS, PLOT_ALPHA, TokenBatch, colors, label
from .model import CharTokenizer, GPTConfig, TinyGPT, completion_logits, completion_logps, sample, sequence_logps

__all__ = [
    "PRESETS",
    "DemoConfig",
    "align",
    "evaluate",
    "get_preferences",
    "get_reference",
    "get_scorer",
    "machine_description",
    "markdown_table",
    "preset",
    "resolve_device",
    "run_demo",
    "validate_config",
]

QUANTILE_LEVELS = tuple(round(0.01 * i, 2) for i in range(1, 100))
SEP = "\n"  # joins reviews in the pretraining stream


@dataclass(frozen=True)
class DemoConfig:
    """Every knob of one demo run; :data:`PRESETS` holds the named sizes."""

    size: str = "small"
    # data
    n_scorer_train: int = 20_000
    n_test_reviews: int = 5_000
    prompt_len: int = 32
    completion_len: int = 48
    n_train_prompts: int = 2048
    n_eval_prompts: int = 1024
    # reference policy
    d_model: int = 128
    n_layer: int = 3
    n_head: int = 4
    context: int = 128
    pretrain_steps: int = 600
    pretrain_batch: int = 32
    pretrain_lr: float = 2e-3
    # alignment
    methods: tuple[str, ...] = tuple(METHODS)
    align_steps: int = 100
    batch_size: int = 32
    lr: float = 1e-4
    beta: float = 0.1
    plot_alpha: float = PLOT_ALPHA  # weight of the token-level OT term of the PLOT methods
    # run
    seed: int = 0
    device: str = "cpu"
    threads: int = 2
    out_dir: str = "outputs/demo"
    cache_dir: str = "outputs/cache"
    use_cache: bool = True
    progress: bool = True


PRESETS: dict[str, dict] = {
    # seconds, for tests
    "tiny": dict(
        n_scorer_train=1500,
        n_test_reviews=500,
        prompt_len=16,
        completion_len=16,
        n_train_prompts=64,
        n_eval_prompts=64,
        d_model=32,
        n_layer=1,
        n_head=2,
        context=64,
        pretrain_steps=40,
        pretrain_batch=16,
        align_steps=4,
        batch_size=8,
        lr=1e-3,
    ),
    # the default: a few minutes on a 2-core CPU
    "small": {},
    # a GPU
    "medium": dict(
        d_model=256,
        n_layer=6,
        n_head=8,
        pretrain_steps=4000,
        pretrain_batch=64,
        n_train_prompts=8192,
        n_eval_prompts=2048,
        align_steps=400,
        batch_size=64,
    ),
    "large": dict(
        d_model=384,
        n_layer=8,
        n_head=8,
        pretrain_steps=10_000,
        pretrain_batch=128,
        n_train_prompts=16_384,
        n_eval_prompts=4096,
        align_steps=1000,
        batch_size=128,
        lr=5e-5,
    ),
}


def preset(size: str, **overrides) -> DemoConfig:
    if size not in PRESETS:
        raise ValueError(f"size must be one of {list(PRESETS)}, got {size!r}")
    return replace(DemoConfig(size=size, **PRESETS[size]), **overrides)


def validate_config(cfg: DemoConfig) -> None:
    """Raise ``ValueError`` naming the first inconsistent setting."""
    positive = (
        "n_scorer_train n_test_reviews prompt_len completion_len n_train_prompts n_eval_prompts d_model n_layer "
        "n_head context pretrain_steps pretrain_batch align_steps batch_size threads"
    ).split()
    for name in positive:
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name} must be at least 1, got {getattr(cfg, name)}")
    for name in ("pretrain_lr", "lr", "beta"):
        v = getattr(cfg, name)
        if not (v > 0 and math.isfinite(v)):
            raise ValueError(f"{name} must be a positive number, got {v}")
    if not (math.isfinite(cfg.plot_alpha) and cfg.plot_alpha >= 0):
        raise ValueError(f"plot_alpha must be a non-negative number, got {cfg.plot_alpha}")
    if cfg.d_model % cfg.n_head:
        raise ValueError(f"d_model ({cfg.d_model}) must be divisible by n_head ({cfg.n_head})")
    if cfg.prompt_len + cfg.completion_len > cfg.context:
        raise ValueError(
            f"prompt_len + completion_len ({cfg.prompt_len} + {cfg.completion_len}) exceeds the context ({cfg.context})"
        )
    if cfg.n_scorer_train + cfg.n_test_reviews > 25_000:
        raise ValueError("n_scorer_train + n_test_reviews must not exceed the 25000 IMDB reviews")
    if cfg.n_train_prompts > cfg.n_scorer_train or cfg.n_eval_prompts > cfg.n_test_reviews:
        raise ValueError(
            "prompts come from the reviews: n_train_prompts <= n_scorer_train, n_eval_prompts <= n_test_reviews"
        )
    if not cfg.methods:
        raise ValueError("methods must name at least one method")
    unknown = [m for m in cfg.methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {list(METHODS)}")
    if len(set(cfg.methods)) != len(cfg.methods):
        raise ValueError(f"methods are repeated: {list(cfg.methods)}")
    if cfg.batch_size > cfg.n_train_prompts:
        raise ValueError(
            f"batch_size ({cfg.batch_size}) exceeds the number of preference pairs ({cfg.n_train_prompts})"
        )


def _key(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


class _Log:
    def __init__(self, progress: bool) -> None:
        self.progress = progress
        self.t0 = time.perf_counter()

    def __call__(self, msg: str) -> None:
        print(f"[{time.perf_counter() - self.t0:6.1f}s] {msg}", flush=True)

    def bar(self, iterable=None, **kw):
        from tqdm.auto import tqdm

        return tqdm(iterable, disable=not self.progress, leave=False, dynamic_ncols=True, file=sys.stderr, **kw)


# ---------------------------------------------------------------------------- stages


def get_scorer(cfg: DemoConfig, reviews, log: _Log):
    from sklearn import __version__ as skv

    from .scorer import train_scorer

    path = Path(cfg.cache_dir) / f"scorer-{_key(cfg.n_scorer_train, cfg.n_test_reviews, cfg.seed, skv)}.pkl"
    if cfg.use_cache and path.is_file():
        with open(path, "rb") as f:
            scorer = pickle.load(f)
        log(f"scorer: loaded {path} (held-out accuracy {scorer.test_accuracy:.3f})")
        return scorer, True
    log(f"scorer: training TF-IDF + logistic regression on {cfg.n_scorer_train} reviews")
    scorer = train_scorer(reviews.train_text, reviews.train_label, reviews.test_text, reviews.test_label)
    log(f"scorer: held-out accuracy {scorer.test_accuracy:.3f} on {len(reviews.test_text)} reviews")
    if cfg.use_cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            pickle.dump(scorer, f)
    return scorer, False


def _encode_stream(tok: CharTokenizer, texts: list[str]) -> torch.Tensor:
    lut = np.zeros(256, dtype=np.uint8)
    for i, c in enumerate(tok.chars):
        lut[ord(c)] = i
    raw = np.frombuffer(SEP.join(texts).encode("ascii"), dtype=np.uint8)
    return torch.from_numpy(lut[raw].astype(np.int64))


def _reference_key(cfg: DemoConfig) -> str:
    fields = (
        "n_scorer_train n_test_reviews d_model n_layer n_head context pretrain_steps pretrain_batch pretrain_lr seed"
    )
    return _key("reference", *(getattr(cfg, f) for f in fields.split()))


def get_reference(cfg: DemoConfig, reviews, device: torch.device, log: _Log):
    path = Path(cfg.cache_dir) / f"reference-{_reference_key(cfg)}.pt"
    if cfg.use_cache and path.is_file():
        model, extra = TinyGPT.load(str(path), map_location=device)
        log(f"reference: loaded {path} ({model.num_params():,} parameters, final loss {extra['final_loss']:.3f})")
        return model.to(device), CharTokenizer(extra["chars"]), extra["final_loss"], True
    tok = CharTokenizer.train([SEP, *reviews.train_text])
    stream = _encode_stream(tok, reviews.train_text)
    torch.manual_seed(cfg.seed)
    gcfg = GPTConfig(
        vocab_size=len(tok), context=cfg.context, n_layer=cfg.n_layer, n_head=cfg.n_head, d_model=cfg.d_model
    )
    model = TinyGPT(gcfg).to(device)
    log(
        f"reference: pretraining a {model.num_params():,}-parameter character GPT on {len(stream):,} characters "
        f"({cfg.pretrain_steps} steps of {cfg.pretrain_batch} x {cfg.context})"
    )
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.pretrain_lr, betas=(0.9, 0.95), weight_decay=0.01)
    warm = max(1, cfg.pretrain_steps // 20)

    def lr_at(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, cfg.pretrain_steps - warm)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    gen = torch.Generator().manual_seed(cfg.seed)
    offs = torch.arange(cfg.context + 1)
    ema = None
    bar = log.bar(range(cfg.pretrain_steps), desc="pretrain reference")
    for _ in bar:
        starts = torch.randint(0, len(stream) - cfg.context - 1, (cfg.pretrain_batch, 1), generator=gen)
        batch = stream[starts + offs].to(device)
        logits, _ = model(batch[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        bar.set_postfix(loss=f"{ema:.3f}")
    model.eval()
    log(f"reference: final training loss {ema:.3f} nats/char")
    if cfg.use_cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        model.save(str(path), extra={"chars": tok.chars, "final_loss": float(ema)})
    return model, tok, float(ema), False


def _prompts(tok: CharTokenizer, texts: list[str], n: int, length: int) -> torch.Tensor:
    """Openings of the first ``n`` reviews at least ``length`` characters long, as ``[n, length]`` ids."""
    rows = [tok.encode(t[:length]) for t in texts if len(t) >= length][:n]
    if len(rows) < n:
        raise ValueError(f"only {len(rows)} reviews have {length} characters; asked for {n} prompts")
    return torch.tensor(rows, dtype=torch.long)


def _sample_batched(model, prompts, length, gen, device, bs, log, desc):
    out = []
    for i in log.bar(range(0, len(prompts), bs), desc=desc):
        out.append(sample(model, prompts[i : i + bs].to(device), length, gen).cpu())
    return torch.cat(out)


@torch.no_grad()
def _logps_batched(model, prompts, completions, device, bs=512):
    model.eval()
    out = [
        completion_logps(model, prompts[i : i + bs].to(device), completions[i : i + bs].to(device)).float().cpu()
        for i in range(0, len(prompts), bs)
    ]
    return torch.cat(out)


def _score(scorer, tok: CharTokenizer, completions: torch.Tensor) -> torch.Tensor:
    texts = [tok.decode(row.tolist()) for row in completions]
    return torch.from_numpy(scorer.score(texts))


def get_preferences(cfg: DemoConfig, reviews, ref, tok, scorer, device, log: _Log):
    """Two reference completions per prompt, scored; for the training and held-out prompts."""
    from sklearn import __version__ as skv

    key = _key(
        "prefs",
        _reference_key(cfg),
        cfg.n_train_prompts,
        cfg.n_eval_prompts,
        cfg.prompt_len,
        cfg.completion_len,
        skv,
    )
    path = Path(cfg.cache_dir) / f"preferences-{key}.pt"
    if cfg.use_cache and path.is_file():
        log(f"preferences: loaded {path}")
        return torch.load(path, weights_only=True), True
    gen = torch.Generator(device=device).manual_seed(cfg.seed + 1)
    bs = 512
    data = {}
    for split, texts, n in (
        ("train", reviews.train_text, cfg.n_train_prompts),
        ("eval", reviews.test_text, cfg.n_eval_prompts),
    ):
        prompts = _prompts(tok, texts, n, cfg.prompt_len)
        ya = _sample_batched(ref, prompts, cfg.completion_len, gen, device, bs, log, f"sample {split} completions A")
        yb = _sample_batched(ref, prompts, cfg.completion_len, gen, device, bs, log, f"sample {split} completions B")
        ra, rb = _score(scorer, tok, ya), _score(scorer, tok, yb)
        a_wins = (ra >= rb).unsqueeze(1)
        data[split] = {
            "prompts": prompts,
            "chosen": torch.where(a_wins, ya, yb),
            "rejected": torch.where(a_wins, yb, ya),
            "r_chosen": torch.maximum(ra, rb),
            "r_rejected": torch.minimum(ra, rb),
        }
        d = data[split]
        d["ref_chosen"] = _logps_batched(ref, prompts, d["chosen"], device)
        d["ref_rejected"] = _logps_batched(ref, prompts, d["rejected"], device)
    # unpaired view of the same completions: desirable = reward above the median (HelpSteer-style binarisation)
    tr = data["train"]
    rewards = torch.cat([tr["r_chosen"], tr["r_rejected"]])
    tr["median_reward"] = rewards.median()
    log(
        f"preferences: {cfg.n_train_prompts} training pairs (mean reward chosen {tr['r_chosen'].mean():.3f}, "
        f"rejected {tr['r_rejected'].mean():.3f}); unpaired split at the median reward {float(tr['median_reward']):.3f}"
    )
    if cfg.use_cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(data, path)
    return data, False


def align(cfg: DemoConfig, method: str, ref: TinyGPT, data: dict, device, log: _Log, batch_size: int | None = None):
    """Fine-tune a copy of ``ref`` with one preference loss; returns the policy and its loss curve."""
    bs = batch_size or cfg.batch_size
    tr = data["train"]
    n = len(tr["prompts"])
    prompts = torch.cat([tr["prompts"], tr["prompts"]])
    comps = torch.cat([tr["chosen"], tr["rejected"]])
    ref_lp = torch.cat([tr["ref_chosen"], tr["ref_rejected"]])
    rewards = torch.cat([tr["r_chosen"], tr["r_rejected"]])
    desirable = torch.nonzero(rewards > tr["median_reward"]).squeeze(1)
    undesirable = torch.nonzero(rewards <= tr["median_reward"]).squeeze(1)
    if min(len(desirable), len(undesirable)) == 0:
        raise ValueError("the median split left no desirable or no undesirable completion")
    policy = copy.deepcopy(ref).to(device)
    policy.train()
    opt = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(cfg.seed + 2)
    spec = METHODS[method]
    loss_fn = spec.loss
    curve = []
    solver_warnings: list[str] = []
    bar = log.bar(range(cfg.align_steps), desc=f"align {label(method)}")
    for _ in bar:
        if spec.paired:
            i = torch.randint(0, n, (bs,), generator=gen)
            ci, ri = i, i + n
        else:
            ci = desirable[torch.randint(0, len(desirable), (bs,), generator=gen)]
            ri = undesirable[torch.randint(0, len(undesirable), (bs,), generator=gen)]
        idx = torch.cat([ci, ri])
        rlp = ref_lp[idx].to(device)
        if spec.needs_tokens:
            # PLOT: the logits over the completion tokens, their labels and the policy's own input
            # embeddings (detached: the geometry of the transport cost, not a parameter of the loss)
            labels = comps[idx].to(device)
            logits = completion_logits(policy, prompts[idx].to(device), labels)
            lp = sequence_logps(logits, labels)
            emb = policy.get_input_embeddings().weight.detach()
            tokens = TokenBatch(logits[:bs], labels[:bs], logits[bs:], labels[bs:], emb)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                loss = loss_fn(lp[:bs], lp[bs:], rlp[:bs], rlp[bs:], cfg.beta, tokens, cfg.plot_alpha)
            _collect_solver_warnings(caught, solver_warnings)
        else:
            lp = completion_logps(policy, prompts[idx].to(device), comps[idx].to(device))
            loss = loss_fn(lp[:bs], lp[bs:], rlp[:bs], rlp[bs:], cfg.beta)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        opt.step()
        curve.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.4f}")
    if solver_warnings:
        log(
            f"align {label(method)}: the entropic OT solver warned {len(solver_warnings)} times in "
            f"{cfg.align_steps} steps; last: {solver_warnings[-1]}"
        )
    policy.eval()
    return policy, curve


def _collect_solver_warnings(caught: list, solver_warnings: list[str]) -> None:
    """Keep ``otloss.entropic_ot``'s warnings (non-convergence) for one summary line; re-issue any other."""
    for w in caught:
        if issubclass(w.category, RuntimeWarning) and str(w.message).startswith("entropic_ot"):
            solver_warnings.append(str(w.message))
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


@torch.no_grad()
def evaluate(cfg: DemoConfig, name: str, policy, ref, tok, scorer, data: dict, device, log: _Log) -> dict:
    """Held-out rewards of fresh samples, KL to the reference, and the chosen-vs-rejected margins."""
    ev = data["eval"]
    gen = torch.Generator(device=device).manual_seed(cfg.seed + 3)
    ys = _sample_batched(policy, ev["prompts"], cfg.completion_len, gen, device, 512, log, f"evaluate {label(name)}")
    rewards = _score(scorer, tok, ys)
    if policy is ref:
        kl = 0.0
        margin = ev["ref_chosen"] - ev["ref_rejected"]
    else:
        # Monte Carlo estimate of KL(policy || ref) on the policy's own samples
        kl = float(
            (_logps_batched(policy, ev["prompts"], ys, device) - _logps_batched(ref, ev["prompts"], ys, device)).mean()
        )
        margin = _logps_batched(policy, ev["prompts"], ev["chosen"], device) - _logps_batched(
            policy, ev["prompts"], ev["rejected"], device
        )
    return {
        "rewards": rewards,
        "kl": kl,
        "margin": margin,
        "samples": [tok.decode(r.tolist()) for r in ys[:5]],
    }


def _metrics(name: str, ev: dict, ref_ev: dict) -> dict:
    r, r0 = ev["rewards"].double(), ref_ev["rewards"].double()
    row = {"method": label(name), "mean_reward": float(r.mean()), "kl_to_ref": ev["kl"]}
    rep = otloss.fsd_report(r, r0, quantiles=(0.1, 0.5, 0.9))
    row["fsd_area"] = rep["fsd_area"]
    row["fsd_w1"] = rep["fsd_w1"]
    row["fsd_w2"] = rep["fsd_w2"]
    for q in (0.1, 0.5, 0.9):
        row[f"dq{int(q * 100)}"] = rep[f"quantile_margin_{q:g}"]
    row["win_rate"] = float(((r > r0).double() + 0.5 * (r == r0).double()).mean())
    m, m0 = ev["margin"].double(), ref_ev["margin"].double()
    row["margin_fsd_area"] = float(otloss.fsd_violation(m, m0, "area"))
    row["margin_median"] = float(m.median())
    return row


COLUMNS = [
    ("method", "method", "{}"),
    ("mean_reward", "mean reward", "{:.3f}"),
    ("win_rate", "win rate vs ref", "{:.3f}"),
    ("fsd_area", "FSD area ↓", "{:.3f}"),
    ("fsd_w1", "FSD W1 ↓", "{:.4f}"),
    ("dq10", "ΔQ(0.1)", "{:+.3f}"),
    ("dq50", "ΔQ(0.5)", "{:+.3f}"),
    ("dq90", "ΔQ(0.9)", "{:+.3f}"),
    ("kl_to_ref", "KL(π‖ref)", "{:.2f}"),
    ("margin_fsd_area", "margin FSD area ↓", "{:.3f}"),
]


def _fmt(v, spec: str) -> str:
    if isinstance(v, float) and math.isnan(v):
        return "-"
    return spec.format(v)


def markdown_table(rows: list[dict]) -> str:
    head = "| " + " | ".join(h for _, h, _ in COLUMNS) + " |"
    sep = "|" + "|".join("---" if k == "method" else "---:" for k, _, _ in COLUMNS) + "|"
    body = ["| " + " | ".join(_fmt(r.get(k, float("nan")), s) for k, _, s in COLUMNS) + " |" for r in rows]
    return "\n".join([head, sep, *body])


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available (use --device cpu)")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError(f"device {name!r} requested but MPS is not available (use --device cpu)")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device must be cpu, cuda[:N], mps or auto, got {name!r}")
    return dev


def machine_description(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}"
    return f"{os.cpu_count()}-core CPU ({platform.machine()}), no GPU"


def run_demo(cfg: DemoConfig) -> dict:
    """Run the whole demo; returns the summary written to ``<out_dir>/results.json``."""
    from . import require_extras

    require_extras()
    validate_config(cfg)
    device = resolve_device(cfg.device)
    torch.set_num_threads(cfg.threads)
    log = _Log(cfg.progress)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    log(f"otloss demo: size={cfg.size} device={device} threads={cfg.threads} seed={cfg.seed}")

    t = time.perf_counter()
    reviews = load_reviews(cfg.n_scorer_train, cfg.n_test_reviews, cfg.seed)
    timings["load_data"] = time.perf_counter() - t
    t = time.perf_counter()
    scorer, scorer_cached = get_scorer(cfg, reviews, log)
    timings["scorer"] = time.perf_counter() - t
    t = time.perf_counter()
    ref, tok, ref_loss, ref_cached = get_reference(cfg, reviews, device, log)
    timings["reference"] = time.perf_counter() - t
    t = time.perf_counter()
    data, prefs_cached = get_preferences(cfg, reviews, ref, tok, scorer, device, log)
    timings["preferences"] = time.perf_counter() - t

    evals = {}
    t = time.perf_counter()
    evals["reference"] = evaluate(cfg, "reference", ref, ref, tok, scorer, data, device, log)
    timings["evaluate"] = time.perf_counter() - t
    curves = {}
    timings["align"] = 0.0
    for method in cfg.methods:
        t = time.perf_counter()
        policy, curves[method] = align(cfg, method, ref, data, device, log)
        timings["align"] += time.perf_counter() - t
        t = time.perf_counter()
        evals[method] = evaluate(cfg, method, policy, ref, tok, scorer, data, device, log)
        timings["evaluate"] += time.perf_counter() - t
        r = evals[method]["rewards"]
        log(
            f"{label(method)}: mean held-out reward {r.mean():.3f} (reference {evals['reference']['rewards'].mean():.3f})"
        )

    ref_row = {
        "method": "reference",
        "mean_reward": float(evals["reference"]["rewards"].mean()),
        "kl_to_ref": 0.0,
        "margin_median": float(evals["reference"]["margin"].median()),
    }
    rows = [ref_row] + [_metrics(m, evals[m], evals["reference"]) for m in cfg.methods]

    t = time.perf_counter()
    from .plots import plot_quantiles

    groups = {
        "paired": [label(m) for m in cfg.methods if METHODS[m].paired],
        "unpaired": [label(m) for m in cfg.methods if not METHODS[m].paired],
    }
    fig_a = plot_quantiles(
        {label(k): v["rewards"] for k, v in evals.items()},
        out / "fig1a_reward_quantiles.png",
        title="Held-out reward of policy samples (Figure 1a analogue)",
        ylabel="reward (scorer logit)",
        **groups,
        levels=QUANTILE_LEVELS,
        colors=colors(),
    )
    fig_b = plot_quantiles(
        {label(k): v["margin"] for k, v in evals.items()},
        out / "fig1b_margin_quantiles.png",
        title="Held-out chosen-minus-rejected log-likelihood margin (Figure 1b analogue)",
        ylabel="log p(chosen) - log p(rejected)",
        **groups,
        levels=QUANTILE_LEVELS,
        colors=colors(),
    )
    timings["plots"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0

    summary = {
        "config": asdict(cfg),
        "machine": machine_description(device),
        "torch": torch.__version__,
        "otloss": otloss.__version__,
        "reference_params": ref.num_params(),
        "reference_final_loss": ref_loss,
        "scorer_test_accuracy": scorer.test_accuracy,
        "cached": {"scorer": scorer_cached, "reference": ref_cached, "preferences": prefs_cached},
        "train_pairs": {
            "mean_reward_chosen": float(data["train"]["r_chosen"].mean()),
            "mean_reward_rejected": float(data["train"]["r_rejected"].mean()),
            "median_reward": float(data["train"]["median_reward"]),
        },
        "timings_s": {k: round(v, 2) for k, v in timings.items()},
        "results": rows,
        "loss_curves": curves,
        "samples": {label(k): v["samples"] for k, v in evals.items()},
        "quantiles": {
            "levels": list(QUANTILE_LEVELS),
            **{
                label(k): otloss.quantile_function(v["rewards"].double(), QUANTILE_LEVELS).tolist()
                for k, v in evals.items()
            },
        },
        "figures": [str(fig_a), str(fig_b)],
    }
    _write_outputs(out, summary, rows)
    _print_summary(summary, out)
    return summary


def _write_outputs(out: Path, summary: dict, rows: list[dict]) -> None:
    import csv

    (out / "results.json").write_text(json.dumps(summary, indent=2))
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    (out / "results.md").write_text(markdown_table(rows) + "\n")
    lines = []
    for name, samples in summary["samples"].items():
        lines.append(f"== {name}")
        lines.extend(f"  {s!r}" for s in samples)
    (out / "samples.txt").write_text("\n".join(lines) + "\n")


def _print_summary(summary: dict, out: Path) -> None:
    print()
    print(
        f"Scorer held-out accuracy: {summary['scorer_test_accuracy']:.3f}   reference: "
        f"{summary['reference_params']:,} parameters, loss {summary['reference_final_loss']:.3f} nats/char"
    )
    print(markdown_table(summary["results"]))
    print()
    print("Rewards and win rates are on fresh samples for held-out prompts; FSD columns measure how far")
    print("each policy's reward distribution is from dominating the reference's at every quantile (0 = dominates).")
    print(f"Total time {summary['timings_s']['total']:.0f}s on {summary['machine']}.")
    print(f"Plots:   {', '.join(summary['figures'])}")
    print(f"Tables:  {out / 'results.md'}, {out / 'results.csv'}, {out / 'results.json'}")

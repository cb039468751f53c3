"""The PLOT methods of the IMDB demo (``plot_dpo``, ``plot_aot``): registry, losses, gradients and the align step."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from tolerances import tol

from examples.imdb import cli
from examples.imdb.losses import METHODS, PLOT_ALPHA, TokenBatch, colors, plot_aot, plot_dpo
from examples.imdb.model import GPTConfig, TinyGPT, completion_logits, completion_logps, sequence_logps

# name: (label, the base method it adds the token-level term to)
PLOT_METHODS = {"plot_dpo": ("PLOT + DPO", "dpo"), "plot_aot": ("PLOT + AOT paired", "aot_paired")}
V, P, L, B = 23, 6, 8, 4


def _model(seed: int = 0) -> TinyGPT:
    torch.manual_seed(seed)
    return TinyGPT(GPTConfig(vocab_size=V, context=P + L, n_layer=1, n_head=2, d_model=16))


def _batch(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(0, V, (2 * B, P), generator=g)
    completions = torch.randint(0, V, (2 * B, L), generator=g)
    ref = -torch.rand(2 * B, generator=g) * 10 - 20
    return prompts, completions, ref


def _loss(model: TinyGPT, name: str, alpha: float = PLOT_ALPHA, beta: float = 0.1):
    """The demo's align-step loss of ``name`` on a fixed batch (as ``pipeline.align`` builds it)."""
    prompts, completions, ref = _batch()
    spec = METHODS[name]
    if not spec.needs_tokens:
        lp = completion_logps(model, prompts, completions)
        return spec.loss(lp[:B], lp[B:], ref[:B], ref[B:], beta)
    logits = completion_logits(model, prompts, completions)
    lp = sequence_logps(logits, completions)
    emb = model.get_input_embeddings().weight.detach()
    tokens = TokenBatch(logits[:B], completions[:B], logits[B:], completions[B:], emb)
    return spec.loss(lp[:B], lp[B:], ref[:B], ref[B:], beta, tokens, alpha)


def _grads(model: TinyGPT, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad for n, p in model.named_parameters()}


def test_registry_lists_the_plot_methods():
    for name, (lab, _) in PLOT_METHODS.items():
        spec = METHODS[name]
        assert spec.label == lab and spec.needs_tokens and spec.paired
    assert METHODS["plot_aot"].sorts_batch and not METHODS["plot_dpo"].sorts_batch
    assert not any(m.needs_tokens for n, m in METHODS.items() if n not in PLOT_METHODS)
    # every method has its own colour in the plots
    palette = colors()
    assert len(set(palette.values())) == len(palette) == 1 + len(METHODS)
    args = cli.build_parser().parse_args(["--methods", "plot_dpo,plot_aot", "--plot-alpha", "0.5", "--device", "cpu"])
    cfg = cli.config_from_args(args)
    assert cfg.methods == ("plot_dpo", "plot_aot") and cfg.plot_alpha == 0.5


@pytest.mark.parametrize("bad", ["-1", "nan", "inf", "x"])
def test_cli_rejects_a_bad_plot_alpha(bad, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--plot-alpha", bad])
    assert e.value.code == 2
    assert "non-negative" in capsys.readouterr().err


def test_logits_and_logps_agree_with_completion_logps():
    model = _model()
    prompts, completions, _ = _batch()
    logits = completion_logits(model, prompts, completions)
    assert logits.shape == (2 * B, L, V)
    # the PLOT path computes the sequence log-probabilities with the very ops of the other methods
    assert torch.equal(sequence_logps(logits, completions), completion_logps(model, prompts, completions))


@pytest.mark.parametrize("name", list(PLOT_METHODS))
def test_plot_loss_is_finite_and_reaches_every_policy_parameter(name):
    model = _model()
    loss = _loss(model, name)
    assert loss.dim() == 0 and math.isfinite(loss.item())
    grads = _grads(model, loss)
    for n, g in grads.items():
        assert g is not None and torch.isfinite(g).all(), n
    # the token embedding (tied with the output layer) and the transformer block receive gradient
    assert grads["tok.weight"].abs().sum() > 0
    assert grads["blocks.0.qkv.weight"].abs().sum() > 0


@pytest.mark.parametrize("name", list(PLOT_METHODS))
def test_alpha_zero_is_the_base_method_and_alpha_one_is_not(name):
    _, base_name = PLOT_METHODS[name]
    model = _model()
    base_grads = _grads(model, _loss(model, base_name))
    zero = _loss(model, name, alpha=0.0)
    assert zero.item() == pytest.approx(_loss(model, base_name).item(), rel=1e-6)
    zero_grads = _grads(model, zero)
    for n in base_grads:
        torch.testing.assert_close(zero_grads[n], base_grads[n], **tol(torch.float32, "parity"), msg=n)
    full = _loss(model, name, alpha=1.0)
    assert full.item() > zero.item() + 0.1  # the token-level term adds a positive cost (here about 1)
    full_grads = _grads(model, full)
    diff = sum(float((full_grads[n] - base_grads[n]).norm()) for n in base_grads)
    scale = sum(float(base_grads[n].norm()) for n in base_grads)
    assert diff > 0.05 * scale  # the PLOT term changes the update materially


def test_plot_losses_validate_the_token_batch():
    z = torch.zeros(B)
    with pytest.raises(TypeError, match="TokenBatch"):
        plot_dpo(z, z, z, z, 0.1, tokens=None)
    with pytest.raises(TypeError, match="TokenBatch"):
        plot_aot(z, z, z, z, 0.1, tokens=(1, 2))


def test_align_step_uses_the_plot_term():
    from examples.imdb.pipeline import _Log, align, preset

    prompts, completions, ref_lp = _batch()
    g = torch.Generator().manual_seed(2)
    rewards = torch.randn(2 * B, generator=g)
    data = {
        "train": {
            "prompts": prompts[:B],
            "chosen": completions[:B],
            "rejected": completions[B:],
            "ref_chosen": ref_lp[:B],
            "ref_rejected": ref_lp[B:],
            "r_chosen": rewards[:B].abs(),
            "r_rejected": -rewards[B:].abs(),
            "median_reward": torch.tensor(0.0),
        }
    }
    cfg = preset("tiny", align_steps=3, batch_size=B, lr=1e-2, progress=False)
    ref = _model()
    log = _Log(progress=False)
    policies = {}
    for name, alpha in (("dpo", 1.0), ("plot_dpo", 0.0), ("plot_dpo", 1.0)):
        run_cfg = dataclasses.replace(cfg, plot_alpha=alpha)
        policy, curve = align(run_cfg, name, ref, data, "cpu", log)
        assert len(curve) == 3 and all(math.isfinite(x) for x in curve), name
        policies[(name, alpha)] = torch.nn.utils.parameters_to_vector(policy.parameters()).detach()
    start = torch.nn.utils.parameters_to_vector(ref.parameters()).detach()
    assert not torch.equal(policies[("plot_dpo", 1.0)], start)
    # alpha = 0 follows DPO's trajectory; alpha = 1 leaves it
    torch.testing.assert_close(policies[("plot_dpo", 0.0)], policies[("dpo", 1.0)], rtol=1e-4, atol=1e-6)
    moved = (policies[("plot_dpo", 1.0)] - policies[("dpo", 1.0)]).norm()
    assert moved > 0.1 * (policies[("dpo", 1.0)] - start).norm()


def test_solver_warnings_are_summarised_and_others_pass_through():
    import warnings

    from examples.imdb.pipeline import _collect_solver_warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.warn("entropic_ot: Sinkhorn did not converge (marginal error 2e-05)", RuntimeWarning, stacklevel=1)
        warnings.warn("something else", UserWarning, stacklevel=1)
    kept: list[str] = []
    with pytest.warns(UserWarning, match="something else"):
        _collect_solver_warnings(caught, kept)
    assert kept == ["entropic_ot: Sinkhorn did not converge (marginal error 2e-05)"]

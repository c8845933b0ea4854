"""PSU (stabilize.py): lambda=0 is a no-op, each channel does what it claims, diagnostics judge."""
import math

import pytest
import torch

from conftest import evals, run, steps
from stabilize import PSU, Diagnostics, NextTokenStats, slope


def test_lambda_zero_never_calls_psu_and_is_bit_identical(tmp_path, monkeypatch):
    plain = steps(run(tmp_path / 'plain', iters=20))

    def forbidden(*args, **kwargs):
        raise AssertionError('PSU was called at lambda=0')
    monkeypatch.setattr(PSU, 'feedback_loss', forbidden)
    monkeypatch.setattr(PSU, 'pull', forbidden)
    for channels in ('stats', 'params', 'both'):
        rows = steps(run(tmp_path / channels, '--psu_lambda=0.0', f'--psu_channels={channels}', iters=20))
        assert [r['loss'] for r in rows] == [r['loss'] for r in plain]


def step_variance(values):
    diffs = [b - a for a, b in zip(values[:-1], values[1:])]
    return sum(d * d for d in diffs) / len(diffs)


def test_stats_channel_lowers_entropy_variance(tmp_path):
    """The P-controller holds the entropy to its EMA: its step-to-step variance falls."""
    base = steps(run(tmp_path / 'base', iters=80))
    held = steps(run(tmp_path / 'held', '--psu_lambda=0.2', '--psu_channels=stats', iters=80))
    assert all('psu_entropy' in r and 'psu_ref_entropy' in r and 'psu_feedback_loss' in r for r in held)
    v_base = step_variance([r['entropy'] for r in base])
    v_held = step_variance([r['entropy'] for r in held])
    assert v_held < 0.5 * v_base, (v_held, v_base)


def mean_update(log):
    return sum(r['update_norm'] for r in steps(log)) / len(steps(log))


def norm_growth(log):
    """How far ||theta|| rose above its start, over the evals at iters 0, 40 and 80."""
    norms = [r['param_norm'] for r in evals(log)]
    assert len(norms) == 3
    return max(norms) - norms[0]


def test_params_channel_shrinks_updates_and_bounds_norm(tmp_path):
    base = run(tmp_path / 'base', '--eval_interval=40', iters=80)
    pulled = run(tmp_path / 'pulled', '--eval_interval=40', '--psu_lambda=0.2', '--psu_channels=params', iters=80)
    assert all(r['psu_pull_norm'] > 0 for r in steps(pulled))
    assert mean_update(pulled) < 0.5 * mean_update(base)
    assert norm_growth(pulled) < norm_growth(base)


def test_feedback_loss_is_a_p_controller():
    """d(loss)/ds = 2 lambda (s - r) / scale^2: the force is proportional to the error (eq. 61)."""
    psu = PSU([torch.zeros(1, requires_grad=True)], lam=0.5, beta=0.9, channels='stats', eot=None)
    logits = torch.zeros(1, 4, 8)
    targets = torch.zeros(1, 4, dtype=torch.long)
    psu.feedback_loss(logits, targets)  # sets the reference to the uniform distribution's stats
    assert torch.allclose(psu.ref, torch.tensor([math.log(8), math.log(8)]))
    sharp = torch.zeros(1, 4, 8, requires_grad=True)
    with torch.no_grad():
        sharp[..., 0] = 3.0
    loss = psu.feedback_loss(sharp, targets)
    s = psu.statistics(sharp.detach(), targets)
    var = 0.9  # the running variance started at 1 and took one step (1 - beta = 0.1) toward 0
    expected = 0.5 * ((s - torch.tensor([math.log(8)] * 2)) ** 2 / var).sum()
    assert torch.allclose(loss, expected)
    loss.backward()
    # raising the sharpened logit lowers entropy further, so the controller pushes it back down
    assert sharp.grad[..., 0].sum() > 0


@pytest.mark.parametrize('eot', [None, 2])
def test_next_token_stats_values_and_hand_written_gradient(eot):
    """Against autograd through the textbook formulas (float64, gradcheck's finite differences)."""
    z = torch.randn(3, 5, 7, dtype=torch.float64, requires_grad=True)
    log_z, p = torch.logsumexp(z, -1), torch.softmax(z, -1)
    expected = [log_z - (p * z).sum(-1), log_z] + ([p[..., eot]] if eot is not None else [])
    torch.testing.assert_close(NextTokenStats.apply(z, eot), torch.stack(expected, -1))
    assert torch.autograd.gradcheck(lambda z: NextTokenStats.apply(z, eot), (z,))


def test_statistics_stay_float32_under_bf16_autocast():
    """On a GPU the logits arrive in bf16 under autocast; s_t and its gradient are still fp32."""
    logits = torch.randn(2, 8, 11).bfloat16().requires_grad_()
    targets = torch.randint(11, (2, 8))
    psu = PSU([torch.zeros(1)], 0.2, 0.99, 'stats', 3)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        s = psu.statistics(logits, targets)
        per_position = NextTokenStats.apply(logits.float(), None)  # how BAARA reads H_b, under autocast
    assert s.dtype == per_position.dtype == torch.float32
    torch.testing.assert_close(s, psu.statistics(logits.float(), targets))
    assert torch.equal(per_position, NextTokenStats.apply(logits.float(), None))
    s.sum().backward()
    assert logits.grad is not None and torch.isfinite(logits.grad.float()).all()


def test_pull_moves_parameters_toward_their_average():
    p = torch.nn.Parameter(torch.zeros(3))
    psu = PSU([p], lam=0.5, beta=0.0, channels='params', eot=None)  # beta 0: the EMA is theta itself
    with torch.no_grad():
        p.add_(1.0)
    psu.pull()
    assert torch.allclose(p, torch.ones(3))  # theta_bar caught up with theta: no pull
    psu = PSU([p], lam=0.5, beta=1.0, channels='params', eot=None)  # beta 1: the EMA is frozen at 1
    with torch.no_grad():
        p.add_(2.0)
    psu.pull()
    assert torch.allclose(p, torch.full((3,), 2.0))  # 3 - 0.5 * (3 - 1)


# ||theta||, ||g||, ||theta_t - theta_t-1|| at 8 evals: all three settle (STABLE), or each grows
STABLE = dict(param_norm=[10.0 + 0.01 * i for i in range(8)], grad_norm=[1.0 / (i + 1) for i in range(8)],
              update_norm=[0.5 / (i + 1) for i in range(8)])
BROKEN = dict(param_norm=[10.0 * 1.2 ** i for i in range(8)], grad_norm=[1.0 + i for i in range(8)],
              update_norm=[0.5 * (i + 1) for i in range(8)])


def diagnostics(param_norm, grad_norm, update_norm):
    """Diagnostics of one eval per norm given; eval i logged the losses [2.0, 1.9, 1.8 + i]."""
    d = Diagnostics()
    for i, norms in enumerate(zip(param_norm, grad_norm, update_norm)):
        d.record(i, *norms, [2.0, 1.9, 1.8 + i])
    return d


def test_verdict_stable_when_all_three_conditions_hold():
    v = diagnostics(**STABLE).verdict()
    assert v['verdict'] == 'stable' and v['param_norm_bounded'] is True
    assert v['param_norm_growth'] == pytest.approx(10.07 / 10.04)  # the largest norm of evals 4..7 over eval 4's
    # judged on the last half, evals 4..7: least-squares slopes of log ||g|| and log ||update||
    assert v['grad_norm_slope'] == pytest.approx(slope([-math.log(i + 1) for i in range(4, 8)]))
    assert v['update_norm_slope'] == pytest.approx(slope([math.log(0.5 / (i + 1)) for i in range(4, 8)]))
    # eval 7's roughness: std of the loss steps [-0.1, 6.9] (3.5) over the mean loss (12.7 / 3)
    assert v['loss_roughness'] == pytest.approx(3.5 / (12.7 / 3))


@pytest.mark.parametrize('condition', ['param_norm', 'grad_norm', 'update_norm'])
def test_verdict_not_stable_when_any_one_condition_fails(condition):
    """Def. 3.1: bounded parameters (1), vanishing gradients (2) and vanishing updates (3) are
    each needed: one broken alone, the other two holding, makes the run 'not stable'."""
    v = diagnostics(**{**STABLE, condition: BROKEN[condition]}).verdict()
    assert v['verdict'] == 'not stable'
    assert v['param_norm_bounded'] == (condition != 'param_norm')
    assert v['param_norm_growth'] == pytest.approx(1.2 ** 3 if condition == 'param_norm' else 10.07 / 10.04)
    assert (v['grad_norm_slope'] > 0) == (condition == 'grad_norm')
    assert (v['update_norm_slope'] > 0) == (condition == 'update_norm')


def test_verdict_judges_the_last_half_only():
    """A jump of ||theta|| and growing gradients in the first half do not count; 4 evals needed."""
    early = dict(STABLE, param_norm=[10.0, 20.0, 40.0, 80.0] + [160.0] * 4,
                 grad_norm=[1.0, 2.0, 3.0, 4.0, 1 / 4, 1 / 5, 1 / 6, 1 / 7])
    assert diagnostics(**early).verdict()['verdict'] == 'stable'
    assert diagnostics(**{k: v[:3] for k, v in STABLE.items()}).verdict()['verdict'] == 'undetermined'
    assert diagnostics(**{k: v[:4] for k, v in STABLE.items()}).verdict()['verdict'] == 'stable'
    assert slope([1, 2, 3]) == pytest.approx(1.0)

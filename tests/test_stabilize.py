"""PSU (stabilize.py): lambda=0 is a no-op, each channel does what it claims, diagnostics judge."""
import json
import math

import pytest
import torch

import train
from stabilize import PSU, Diagnostics, NextTokenStats, slope

TINY = ['--n_layer=2', '--n_head=2', '--n_embd=32', '--block_size=32', '--batch_size=8',
        '--eval_interval=40', '--eval_iters=2', '--num_samples=2', '--sample_tokens=8',
        '--log_interval=1', '--warmup_iters=5', '--learning_rate=3e-3']


def run(tmp_path, name, *flags, iters=80):
    out = tmp_path / name
    train.main(TINY + [f'--out_dir={out}', f'--max_iters={iters}', f'--lr_decay_iters={iters}', *flags])
    return [json.loads(line) for line in open(out / 'log.jsonl')]


def training_rows(rows):
    return [r for r in rows if 'loss' in r]


def test_lambda_zero_never_calls_psu_and_is_bit_identical(tmp_path, monkeypatch):
    plain = run(tmp_path, 'plain', iters=20)

    def forbidden(*args, **kwargs):
        raise AssertionError('PSU was called at lambda=0')
    monkeypatch.setattr(PSU, 'feedback_loss', forbidden)
    monkeypatch.setattr(PSU, 'pull', forbidden)
    for channels in ('stats', 'params', 'both'):
        rows = run(tmp_path, channels, '--psu_lambda=0.0', f'--psu_channels={channels}', iters=20)
        assert [r['loss'] for r in training_rows(rows)] == [r['loss'] for r in training_rows(plain)]


def step_variance(values):
    diffs = [b - a for a, b in zip(values[:-1], values[1:])]
    return sum(d * d for d in diffs) / len(diffs)


def test_stats_channel_lowers_entropy_variance(tmp_path):
    """The P-controller holds the entropy to its EMA: its step-to-step variance falls."""
    base = training_rows(run(tmp_path, 'base'))
    held = training_rows(run(tmp_path, 'held', '--psu_lambda=0.2', '--psu_channels=stats'))
    assert all('psu_entropy' in r and 'psu_ref_entropy' in r and 'psu_feedback_loss' in r for r in held)
    v_base = step_variance([r['entropy'] for r in base])
    v_held = step_variance([r['entropy'] for r in held])
    assert v_held < 0.5 * v_base, (v_held, v_base)


def test_params_channel_shrinks_updates_and_bounds_norm(tmp_path):
    base = training_rows(run(tmp_path, 'base'))
    pulled = training_rows(run(tmp_path, 'pulled', '--psu_lambda=0.2', '--psu_channels=params'))
    assert all(r['psu_pull_norm'] > 0 for r in pulled)
    mean_update = lambda rows: sum(r['update_norm'] for r in rows) / len(rows)
    assert mean_update(pulled) < 0.5 * mean_update(base)
    norms = lambda name: [json.loads(l)['param_norm'] for l in open(tmp_path / name / 'log.jsonl') if 'param_norm' in l]
    assert max(norms('pulled')) - norms('pulled')[0] < max(norms('base')) - norms('base')[0]


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


def test_verdict_rule():
    d = Diagnostics()
    for i in range(8):  # bounded norm, shrinking gradient and update norms
        d.record(i, 10.0 + 0.01 * i, 1.0 / (i + 1), 0.5 / (i + 1), [2.0, 1.9, 1.85])
    assert d.verdict()['verdict'] == 'stable'
    d = Diagnostics()
    for i in range(8):  # the parameter norm keeps growing
        d.record(i, 10.0 * 1.2 ** i, 1.0 / (i + 1), 0.5 / (i + 1), [2.0, 1.9])
    assert d.verdict()['verdict'] == 'not stable'
    assert Diagnostics().verdict()['verdict'] == 'undetermined'
    assert slope([1, 2, 3]) == pytest.approx(1.0)

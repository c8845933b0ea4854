"""PSU (stabilize.py): lambda=0 is a no-op, each channel does what it claims, diagnostics judge."""
import math

import pytest
import torch

from checkpoint import load_psu_state, psu_state
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
    assert torch.allclose(psu.ref, torch.tensor([math.log(8), math.log(8)]), rtol=16 * 2 ** -24, atol=0)  # fp32 log 8, sums of 8 and 4 equal terms: <= 16 eps32
    sharp = torch.zeros(1, 4, 8, requires_grad=True)
    with torch.no_grad():
        sharp[..., 0] = 3.0
    loss = psu.feedback_loss(sharp, targets)
    s = psu.statistics(sharp.detach(), targets)
    var = 0.9  # the running variance started at 1 and took one step (1 - beta = 0.1) toward 0
    expected = 0.5 * ((s - torch.tensor([math.log(8)] * 2)) ** 2 / var).sum()
    assert torch.allclose(loss, expected, rtol=64 * 2 ** -24, atol=0)  # fp32: r = log 8 to 16 eps32 (above), |s - r| > 1, squared: <= 64 eps32
    loss.backward()
    # raising the sharpened logit lowers entropy further, so the controller pushes it back down
    assert sharp.grad[..., 0].sum() > 0


@pytest.mark.parametrize('eot', [None, 2])
def test_next_token_stats_values_and_hand_written_gradient(eot):
    """Against autograd through the textbook formulas (float64, gradcheck's finite differences)."""
    z = torch.randn(3, 5, 7, dtype=torch.float64, requires_grad=True)
    log_z, p = torch.logsumexp(z, -1), torch.softmax(z, -1)
    expected = [log_z - (p * z).sum(-1), log_z] + ([p[..., eot]] if eot is not None else [])
    torch.testing.assert_close(NextTokenStats.apply(z, eot), torch.stack(expected, -1), rtol=1e-12, atol=1e-12)  # fp64, 7 terms: ~1e-15
    assert torch.autograd.gradcheck(lambda z: NextTokenStats.apply(z, eot), (z,))  # fp64 differences (eps 1e-6) err ~1e-10 << atol 1e-5


def test_statistics_stay_float32_under_bf16_autocast():
    """On a GPU the logits arrive in bf16 under autocast; s_t and its gradient are still fp32."""
    logits = torch.randn(2, 8, 11).bfloat16().requires_grad_()
    targets = torch.randint(11, (2, 8))
    psu = PSU([torch.zeros(1)], 0.2, 0.99, 'stats', 3)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        s = psu.statistics(logits, targets)
        per_position = NextTokenStats.apply(logits.float(), None)  # how BAARA reads H_b, under autocast
    assert s.dtype == per_position.dtype == torch.float32
    assert torch.equal(s, psu.statistics(logits.float(), targets))  # the same fp32 ops: autocast casts none of them
    assert torch.equal(per_position, NextTokenStats.apply(logits.float(), None))
    s.sum().backward()
    assert logits.grad is not None and torch.isfinite(logits.grad.float()).all()


def test_pull_moves_parameters_toward_their_average():
    p = torch.nn.Parameter(torch.zeros(3))
    psu = PSU([p], lam=0.5, beta=0.0, channels='params', eot=None)  # beta 0: the EMA is theta itself
    with torch.no_grad():
        p.add_(1.0)
    psu.pull()
    assert torch.equal(p, torch.ones(3))  # theta_bar caught up with theta: no pull (lerp to itself: exact)
    psu = PSU([p], lam=0.5, beta=1.0, channels='params', eot=None)  # beta 1: the EMA is frozen at 1
    with torch.no_grad():
        p.add_(2.0)
    psu.pull()
    assert torch.equal(p, torch.full((3,), 2.0))  # 3 - 0.5 * (3 - 1): small integers and halves, exact


def one_line_exit(psu, state):
    """The message of the SystemExit that load_psu_state(psu, state) raises: one 'error: ' line."""
    with pytest.raises(SystemExit) as exit_info:
        load_psu_state(psu, state)
    message = str(exit_info.value.code)
    assert message.startswith('error: ') and '\n' not in message, message
    return message


def test_a_saved_state_that_does_not_fit_stops_with_one_line(monkeypatch):
    """Resuming after a statistic was added (a fourth name; NextTokenStats would compute four) stops
    in load_psu_state with one line naming both counts, not with a size mismatch (4 vs 3) at the
    next step; so does a parameter EMA with another number or shape of tensors."""
    p = torch.nn.Parameter(torch.randn(3))
    psu = PSU([p], lam=0.2, beta=0.9, channels='both', eot=2)
    psu.feedback_loss(torch.randn(2, 4, 8), torch.randint(8, (2, 4)))
    psu.pull()
    state = psu_state(psu)
    assert len(state['ref']) == 3 and len(state['ema']) == 1
    load_psu_state(PSU([p], lam=0.2, beta=0.9, channels='both', eot=2), state)  # it fits: loads
    grown = PSU([p], lam=0.2, beta=0.9, channels='both', eot=2)
    monkeypatch.setattr(grown, 'names', grown.names + ['top_prob'])
    message = one_line_exit(grown, state)
    assert "PSU reference holds 3 statistics" in message
    assert 'computes 4 (entropy, log_partition, eot_prob, top_prob)' in message
    more = PSU([p, torch.nn.Parameter(torch.zeros(2))], lam=0.2, beta=0.9, channels='params', eot=2)
    assert 'EMA holds 1 tensors' in one_line_exit(more, {**state, 'ref': None, 'var': None})
    wider = PSU([torch.nn.Parameter(torch.zeros(4))], lam=0.2, beta=0.9, channels='params', eot=2)
    assert 'has shape (3,)' in one_line_exit(wider, {**state, 'ref': None, 'var': None})


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
    assert v['param_norm_growth'] == pytest.approx(10.07 / 10.04, rel=1e-12)  # the largest norm of evals 4..7 over eval 4's (fp64: ~1e-16)
    # judged on the last half, evals 4..7: least-squares slopes of log ||g|| and log ||update||
    assert v['grad_norm_slope'] == pytest.approx(slope([-math.log(i + 1) for i in range(4, 8)]), rel=1e-12)  # fp64: ~1e-15
    assert v['update_norm_slope'] == pytest.approx(slope([math.log(0.5 / (i + 1)) for i in range(4, 8)]), rel=1e-12)  # fp64
    # eval 7's roughness: std of the loss steps [-0.1, 6.9] (3.5) over the mean loss (12.7 / 3)
    assert v['loss_roughness'] == pytest.approx(3.5 / (12.7 / 3), rel=1e-12)  # fp64, a few roundings: ~1e-15


@pytest.mark.parametrize('condition', ['param_norm', 'grad_norm', 'update_norm'])
def test_verdict_not_stable_when_any_one_condition_fails(condition):
    """Def. 3.1: bounded parameters (1), vanishing gradients (2) and vanishing updates (3) are
    each needed: one broken alone, the other two holding, makes the run 'not stable'."""
    v = diagnostics(**{**STABLE, condition: BROKEN[condition]}).verdict()
    assert v['verdict'] == 'not stable'
    assert v['param_norm_bounded'] == (condition != 'param_norm')
    assert v['param_norm_growth'] == pytest.approx(1.2 ** 3 if condition == 'param_norm' else 10.07 / 10.04, rel=1e-12)  # fp64
    assert (v['grad_norm_slope'] > 0) == (condition == 'grad_norm')
    assert (v['update_norm_slope'] > 0) == (condition == 'update_norm')


def test_verdict_judges_the_last_half_only():
    """A jump of ||theta|| and growing gradients in the first half do not count; 4 evals needed."""
    early = dict(STABLE, param_norm=[10.0, 20.0, 40.0, 80.0] + [160.0] * 4,
                 grad_norm=[1.0, 2.0, 3.0, 4.0, 1 / 4, 1 / 5, 1 / 6, 1 / 7])
    assert diagnostics(**early).verdict()['verdict'] == 'stable'
    assert diagnostics(**{k: v[:3] for k, v in STABLE.items()}).verdict()['verdict'] == 'undetermined'
    assert diagnostics(**{k: v[:4] for k, v in STABLE.items()}).verdict()['verdict'] == 'stable'
    assert slope([1, 2, 3]) == 1.0  # 2 / 2: exact


# -----------------------------------------------------------------------------
# the logged step's measurements: ||theta_t - theta_{t-1}|| without a parameter copy, entropy in pieces

def tiny_training(wd, lam, baara_on, vocab=None, seed=0):
    """A 2-layer model, its AdamW, PSU and (BAARA), and a next_batch: train.py's parts, in this process."""
    import numpy as np
    import train
    from baara import BAARA
    from data import load_data
    from model import GPT, GPTConfig
    ids, _, tok, _, _ = load_data('synthetic', 'word', n_sentences=5000)
    torch.manual_seed(seed)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64 if vocab else 32, block_size=16, vocab_size=vocab or tok.vocab_size))
    optimizer = model.configure_optimizers(wd, 3e-3, (0.9, 0.99), 'cpu')
    psu = PSU(model.parameters(), lam, 0.99, 'both', tok.eot)
    c, gen = {**train.DEFAULTS, 'batch_size': 8, 'block_size': 16}, torch.Generator().manual_seed(seed)
    baara = BAARA(model, np.bincount(ids), seed, lambda g: train.batch(ids, c, tok, g, 'cpu'), 'flops') if baara_on else None
    return model, optimizer, psu, baara, lambda: train.batch(ids, c, tok, gen, 'cpu')


@pytest.mark.parametrize('wd, lam, baara_on', [(0.0, 0.0, False), (0.1, 0.0, False), (0.1, 0.2, False), (0.1, 0.2, True)],
                         ids=['adamw', 'weight decay', 'psu params', 'baara'])
def test_update_norm_is_the_snapshot_difference(wd, lam, baara_on, monkeypatch):
    """train_step(measure=True)'s update norm (step_measuring_update: AdamW's step taken in pieces, each
    piece's difference kept; PSU's pull to come added) is ||theta_t - theta_{t-1}|| of a parameter copy,
    over 30 steps, pieces of 1024 elements (the embedding splits into several). The differences are the
    same fp32 subtractions, so only the sums of squares differ (fp32 dots of <= 1024, then 56 pieces, in any order):
    (1024 + 64) / 2 eps32 relative against the copy's norm in float64 (the sqrt halves it); PSU's pull is computed
    once more (pending_pull), and theta_t rounds it: eps32 = 2^-24 of |theta_t| each, 2^-24 ||theta_t|| absolute."""
    import distributed
    import train
    from stabilize import param_norm
    monkeypatch.setattr(distributed, 'PIECE', 1024)
    model, optimizer, psu, baara, next_batch = tiny_training(wd, lam, baara_on)
    params, scopes = list(model.parameters()), set()
    assert params[0].numel() > 3 * 1024
    for _ in range(30):
        before = [p.detach().clone() for p in params]
        _, _, update, _, _ = train.train_step(model, optimizer, next_batch, 3e-3, psu, baara, measure=True)
        snapshot = math.sqrt(sum(((p.detach() - b).double() ** 2).sum().item() for p, b in zip(params, before)))
        assert update.item() == pytest.approx(snapshot, rel=2 ** -24 * (1024 + 64) / 2, abs=2 ** -24 * param_norm(params).item() if lam else 0)
        scopes.add(baara.last['scope'] if baara else 'all')
    assert scopes == ({'all', 'top'} if baara_on else {'all'})  # with BAARA, steps that froze blocks were checked


def with_adamw(training, **kind):
    """tiny_training's parts with its AdamW rebuilt (the same groups and settings) as AdamW(**kind)."""
    model, optimizer, psu, baara, next_batch = training
    groups = [{'params': g['params'], 'weight_decay': g['weight_decay']} for g in optimizer.param_groups]
    return model, torch.optim.AdamW(groups, lr=3e-3, betas=(0.9, 0.99), **kind), psu, baara, next_batch


@pytest.mark.parametrize('lam, baara_on, kind', [(0.0, False, {}), (0.2, False, {}), (0.2, True, {}), (0.2, True, {'foreach': True})],
                         ids=['adamw', 'psu both', 'baara', 'baara foreach'])
def test_a_logged_step_takes_the_unlogged_step(lam, baara_on, kind, monkeypatch):
    """Measuring changes nothing: from a fresh optimiser (AdamW's state made on the first step, a logged
    one), 12 steps logged every third give the parameters and AdamW state (values, dtypes, devices) of 12
    unlogged steps (one optimizer.step() each) bit for bit, with pieces of 1024 elements (whole SIMD
    vectors; a tensor's last piece shorter). train.py's fused AdamW, and the foreach one of other devices."""
    import distributed
    import train
    monkeypatch.setattr(distributed, 'PIECE', 1024)
    logged, unlogged = (tiny_training(0.1, lam, baara_on) for _ in range(2))
    if kind:
        logged, unlogged = with_adamw(logged, **kind), with_adamw(unlogged, **kind)
    for step in range(12):
        for (model, optimizer, psu, baara, next_batch), measure in ((logged, step % 3 == 0), (unlogged, False)):
            train.train_step(model, optimizer, next_batch, 3e-3, psu, baara, measure=measure)
    same = lambda a, b: torch.equal(a, b) and a.dtype == b.dtype and a.device == b.device
    for p, q in zip(logged[0].parameters(), unlogged[0].parameters()):
        assert same(p, q)
        state, reference = logged[1].state[p], unlogged[1].state[q]
        assert state.keys() == reference.keys() and all(same(state[k], reference[k]) for k in state)
    embedding = logged[0].transformer.wte.weight  # moves at every step, BAARA's scope or not
    assert logged[1].state[embedding]['step'].item() == 12 and embedding.numel() > 3 * 1024


def test_fused_adamw_on_the_cpu_trains_as_the_default_adamw():
    """train.py's AdamW is torch's fused kernel on the CPU as on CUDA. Against torch's default (foreach) AdamW with
    the same groups (decay 0.1 on the 2-D weights), 30 steps of the same model and batches give the same losses
    within 3e-6 relative: the two round the same update in other orders, ulps apart (measured: 1.1e-7 at most), and
    then each loss, a fp32 mean of 128 positions, rounds apart: sd <= sqrt(128 / 3) eps32 each in any order, 5 sd of
    the difference is 5 sqrt(2) sqrt(128 / 3) eps32 = 2.8e-6; a changed hyperparameter (eps 1e-8 -> 1e-7) moves them by 8e-6."""
    import train
    model, optimizer, _, _, next_batch = tiny_training(0.1, 0.0, False)
    reference_model, _, _, _, reference_batch = tiny_training(0.1, 0.0, False)  # the same weights and batches
    assert all(group['fused'] for group in optimizer.param_groups)
    params = list(reference_model.parameters())
    reference = torch.optim.AdamW([{'params': [p for p in params if p.dim() >= 2], 'weight_decay': 0.1},
                                   {'params': [p for p in params if p.dim() < 2], 'weight_decay': 0.0}],
                                  lr=3e-3, betas=(0.9, 0.99), foreach=True)
    for step in range(30):
        loss, _, _, _, _ = train.train_step(model, optimizer, next_batch, 3e-3)
        reference_loss, _, _, _, _ = train.train_step(reference_model, reference, reference_batch, 3e-3)
        assert loss.item() == pytest.approx(reference_loss.item(), rel=3e-6, abs=0), f'step {step}'  # see above
    assert loss.item() < 0.8 * math.log(model.config.vocab_size)  # it trained: from log(V) at the start


class LargestNewTensor(torch.utils._python_dispatch.TorchDispatchMode):
    """The bytes of the largest tensor that the ops run under it allocate (an output that shares no
    input's storage: views and in-place results do not count)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        flat = lambda tree: [t for t in torch.utils._pytree.tree_leaves(tree) if isinstance(t, torch.Tensor)]
        inputs = {t.untyped_storage().data_ptr() for t in flat((args, kwargs))}
        for t in flat(out):
            if t.untyped_storage().data_ptr() not in inputs:
                self.largest = max(self.largest, t.untyped_storage().nbytes())
        return out


@pytest.mark.parametrize('lam', [0.0, 0.2], ids=['psu off', 'psu both'])
def test_logged_step_allocates_no_parameter_or_logits_sized_tensor(lam, monkeypatch):
    """What a logged step measures (train_step's step_measuring_update, then logged_numbers: the entropy,
    the host syncs) allocates no tensor over PIECE floats (1 MiB), a quarter of the embedding (16384 x 64
    floats, 4 MiB) and an eighth of the logits (8 x 16 x 16384, 8 MiB): no copy of the parameters or
    of the logits, at any model size. AdamW's own state (m, v) is made by a run's first step, before."""
    import train
    from distributed import PIECE, step_measuring_update
    model, optimizer, psu, _, _ = tiny_training(0.1, lam, False, vocab=16384)
    x = torch.randint(16384, (8, 16), generator=torch.Generator().manual_seed(0))
    mode = LargestNewTensor()

    def measured(*args):
        with mode:
            return step_measuring_update(*args)
    monkeypatch.setattr(train.distributed, 'step_measuring_update', measured)
    train.train_step(model, optimizer, lambda: (x, x), 3e-3, psu)  # the first step: AdamW's m and v
    for _ in range(2):
        _, grad_norm, update, logits, y = train.train_step(model, optimizer, lambda: (x, x), 3e-3, psu, measure=True)
        with mode:
            train.logged_numbers(grad_norm, update, logits, y, psu)
    assert model.transformer.wte.weight.numel() >= 4 * PIECE and logits.numel() >= 8 * PIECE
    assert 0 < mode.largest <= 4 * PIECE, mode.largest


def test_logged_entropy_is_exact_and_psus():
    """The logged entropy without PSU (metrics.predictive_entropy, a few rows at a time: 5 rows of 50k logits,
    24 rows in 5 pieces) is the mean entropy over the positions with a target (BERT's -1 left out): float64's
    to 5 sqrt(n) eps32 = 6.7e-5 relative (float32 sums of n = 50k terms, any order: rounding ~sqrt(n) eps32, measured
    5e-8 to 1.9e-6 by SIMD width, 1.8e-5 one term at a time; n eps32 = 3e-3 could never fail), and so PSU.statistics' own."""
    from metrics import predictive_entropy
    logits = 3 * torch.randn(4, 6, 50_000, generator=torch.Generator().manual_seed(0))
    targets = torch.randint(50_000, (4, 6), generator=torch.Generator().manual_seed(1))
    targets[0, :4] = targets[2, 5] = -1
    log_p = torch.log_softmax(logits.double(), dim=-1)
    exact = (-(log_p.exp() * log_p).sum(-1))[targets != -1].mean().item()
    psu = PSU([torch.zeros(1)], 0.1, 0.99, 'stats', eot=0)
    assert predictive_entropy(logits, targets != -1).item() == pytest.approx(exact, rel=5 * math.sqrt(50_000) * 2 ** -24)
    assert psu.statistics(logits, targets)[0].item() == pytest.approx(exact, rel=5 * math.sqrt(50_000) * 2 ** -24)
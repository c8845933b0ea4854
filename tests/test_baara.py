"""BAARA (baara.py): Theorem B.1 shown (with a state-blind control), eqs. 65-69 on hand-built
cases, the keep decision credited to the batch it runs on, inactive blocks frozen under AdamW,
baara=False untouched, resume exactness."""
import json
import math
import subprocess
import sys

import pytest
import torch

import baara as B
import theorem_b1 as T
import train
from baara import BAARA, confidence, flop_ratio
from conftest import ROOT
from model import GPT, GPTConfig

TINY = ['--n_layer=2', '--n_head=2', '--n_embd=32', '--block_size=32', '--batch_size=8',
        '--eval_interval=10', '--eval_iters=2', '--num_samples=2', '--sample_tokens=8',
        '--log_interval=1', '--warmup_iters=5', '--device=cpu', '--eval_dist_samples=0']
SEEDS = (2025, 2026, 2027)


def run(tmp_path, name, *flags, iters=20):
    out = tmp_path / name
    train.main(TINY + [f'--out_dir={out}', f'--max_iters={iters}', f'--lr_decay_iters={iters}', *flags])
    return [json.loads(line) for line in open(out / 'log.jsonl')]


def steps(rows):
    return [{k: v for k, v in r.items() if k not in ('tok_per_s', 'eta_s')} for r in rows if 'loss' in r]


# ---- Theorem B.1: noisy batches (random targets) end up with a smaller alpha

@pytest.fixture(scope='module')
def gaps():
    return {blind: [T.theorem_b1(seed, blind=blind) for seed in SEEDS] for blind in (False, True)}


def test_theorem_b1_noisy_batches_get_a_smaller_alpha(gaps):
    for clean, noisy in gaps[False]:
        assert clean - noisy > 0.25, gaps[False]
    assert sum(c - n for c, n in gaps[False]) / len(SEEDS) > 0.5, gaps[False]


def test_state_blind_policy_shows_no_gap(gaps):
    """The control: with its state zeroed the policy cannot tell the batches apart, so the
    assertion above would fail for it."""
    for clean, noisy in gaps[True]:
        assert abs(clean - noisy) < 0.1, gaps[True]  # a coin flip E[alpha] cannot see: a random split's gap, se ~0.01 (sd 0.06, ~95/55 steps); 0.1 = 10 se


# ---- the pieces of eqs. 63-69 on hand-built inputs

def tiny_model(**units):
    torch.manual_seed(0)
    return GPT(GPTConfig(n_layer=4, n_head=2, n_embd=16, block_size=8, vocab_size=11, **units))


def fixed_batch():
    g = torch.Generator().manual_seed(1)
    return torch.randint(11, (4, 8), generator=g), torch.randint(11, (4, 8), generator=g)


def test_confidence_reward_and_cost():
    assert confidence(math.log(11), 11) == 0.0                         # uniform prediction: c = 0 (1 - x / x: exact)
    assert confidence(0.0, 11) == 1.0                                   # certain prediction: c = 1
    model = tiny_model()
    baara = BAARA(model, [1] * 11, 0, lambda g: fixed_batch())
    y = torch.randint(11, (2, 8))
    for logits, c in ((torch.zeros(2, 8, 11), 0.0), (torch.full((2, 8, 11), -30.0).scatter(-1, y[..., None], 30.0), 1.0)):
        baara.start()
        baara.observe(logits, y, torch.tensor(1.0))
        entropy = (baara.batch_sums / baara.n_micro)[1].item()
        assert 0 <= confidence(entropy, 11) <= 1 and confidence(entropy, 11) == pytest.approx(c, abs=32 * 2 ** -24)  # fp32 H: 11 + 16 terms
    baara.values, baara.last = [1.0, 2.0, 3.0], {'confidence': 0.5}
    assert baara.reward(6.0) == ((1 + 2 + 3 + 6) / 4 * 0.5, 6 * 0.5 / 4)  # eqs. 66, 68; r_b's own part (1.5, 0.75: exact)
    baara.values = list(range(100))
    assert baara.reward(0.0)[0] == sum(range(100 - B.WINDOW + 1, 100)) / B.WINDOW * 0.5  # integers, / 8, * 0.5: exact
    config = tiny_model(dmu_p=0.5, dtu_r=0.5).config
    assert flop_ratio(config, 1.0, 1.0) == 1.0 and flop_ratio(config, 0.5, 0.5) < flop_ratio(config, 0.5, 1.0) < 1


def test_measured_cost_leaves_out_each_keeps_first_step():
    """C_b from step times (eq. 63): a keep's first step, where torch.compile compiles its graph
    (seconds against milliseconds), is not timed, or it would dominate the running mean."""
    baara = BAARA(tiny_model(dmu_p=0.5), [1] * 11, 0, lambda g: fixed_batch())
    baara.t_start = 0.0  # so that a clock stamp t_end is the step's seconds
    for keep, elapsed in ((0, 30.0), (0, 1.0), (1, 40.0), (1, 2.0)):  # keep 1 is off: p = 1
        baara.keep_now = keep
        baara.record_time(elapsed)
    assert baara.step_time == {0: 1.0, 1: 2.0}  # the first steps' 30 s and 40 s are not in the means
    baara.keep_now = 0
    assert baara.complexity() == 0.5


def test_reference_gradient_runs_under_the_training_autocast():
    """g_ref (eq. 65) is computed under the ctx train.py passes: bf16 on a GPU, where float32
    would cost many times the 2.5% of a step that REF_FRACTION buys."""
    fp32 = BAARA(tiny_model(), [1] * 11, 0, lambda g: fixed_batch()).g_ref
    bf16 = BAARA(tiny_model(), [1] * 11, 0, lambda g: fixed_batch(),
                 ctx=torch.autocast('cpu', dtype=torch.bfloat16)).g_ref
    assert fp32.dtype == bf16.dtype == torch.float32 and not torch.equal(fp32, bf16)
    assert torch.nn.functional.cosine_similarity(fp32, bf16, dim=0) > 0.99


def test_reinforce_raises_the_probability_of_a_rewarded_action():
    baara = BAARA(tiny_model(), [1] * 11, 0, lambda g: fixed_batch())
    s = torch.randn(len(B.FEATURES), dtype=torch.float64)
    before = baara.probs('alpha', s)[3].item()
    baara.baseline.count, baara.baseline.var = 10, torch.ones(1, dtype=torch.float64)  # mean 0, std 1
    baara.last, baara.step, baara.decisions = {'confidence': 1.0}, 1, {0: [('alpha', s, 3)]}
    baara.learn(1.0)
    assert baara.probs('alpha', s)[3].item() > before


def test_logged_and_learned_reward_are_both_reward(monkeypatch):
    """r_b has one definition, BAARA.reward (eq. 68): log() logs its first value, learn() learns
    from its second (the part that a_b changed). A reward swapped there changes both."""
    baara = BAARA(tiny_model(), [1] * 11, 0, lambda g: fixed_batch())
    s = torch.randn(len(B.FEATURES), dtype=torch.float64)
    baara.baseline.count, baara.baseline.var = 10, torch.ones(1, dtype=torch.float64)  # mean 0, std 1
    baara.last = dict(alpha=1.0, scope='all', keep=(1.0, 1.0), C=1.0, confidence=0.5, expected_alpha=1.0)
    baara.step, baara.decisions = 1, {0: [('alpha', s, 3)]}
    baara.value = torch.tensor(2.0, dtype=torch.float64)
    assert baara.log()['baara_reward'] == 0.5 * 2.0  # eq. 68 as written: vbar_b c_b, with W = 1
    swapped = {}
    monkeypatch.setattr(BAARA, 'reward', lambda self, v: swapped.setdefault(v, (-7.0 * v, -3.0)))
    assert baara.log()['baara_reward'] == -14.0
    probs = baara.probs('alpha', s)
    baara.learn(2.0)
    assert swapped.keys() == {2.0}
    assert baara.baseline.mean.item() == pytest.approx(-3.0 / 11)  # the baseline learned -3 ...
    advantage = -3.0 / (1 + 1e-8)  # ... and so did the head: (own part - mean 0) / std 1
    step = B.POLICY_LR * advantage * torch.outer(torch.eye(len(B.ALPHAS))[3].double() - probs,
                                                 torch.cat([s, s.new_ones(1)]))
    assert torch.allclose(baara.heads['alpha'], step, rtol=1e-12, atol=0)
    assert baara.probs('alpha', s)[3] < probs[3]  # the swapped reward's -3 lowered alpha 3


def test_reward_second_value_is_the_part_of_r_b_that_a_b_changed():
    """reward()'s two values stay one reward: the second is r_b(v_b) - r_b(0), the part of the
    first that a_b (which moved v_b alone) changed; a new r_b must change both."""
    baara = BAARA(tiny_model(), [1] * 11, 0, lambda g: fixed_batch())
    baara.last = {'confidence': 0.7}
    for values in ([], [1.0, -2.0], [float(i) for i in range(20)]):
        baara.values = values
        for v in (3.0, -1.5, 0.25):
            r_b, own = baara.reward(v)
            assert own == pytest.approx(r_b - baara.reward(0.0)[0], rel=1e-12, abs=1e-12)


def test_keep_is_credited_with_the_reward_of_the_batch_it_runs_on():
    """Keep ratios act in the forward pass, so the keep drawn at step b runs on batch b+1: batch
    b+1's reward trains the keep head, on step b's state; batch b's reward trains only the alpha
    and scope drawn at step b. v_b is set by hand: +1000 for batch 0, -1000 for batch 1."""
    model, (x, y) = tiny_model(dmu_p=0.5), fixed_batch()
    baara = BAARA(model, [1] * 11, 0, lambda g: (x, y), cost='flops')
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    baara.baseline.count, baara.baseline.var = 10, torch.ones(1, dtype=torch.float64)  # advantage = r_b's own part
    for raw in torch.randn(2, len(B.FEATURES), dtype=torch.float64, generator=torch.Generator().manual_seed(0)):
        baara.norm.update(raw)  # a history, so that step 0's state is not 0 (a first state normalises to 0)
    for step, v in enumerate((1000.0, -1000.0, None)):
        baara.start()
        logits, loss = model(x, y)
        baara.observe(logits, y, loss)
        loss.backward()
        baara.act(optimizer, 0.01)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        baara.finish()
        assert baara.last['confidence'] > 0  # else r_b = v_b c_b would be 0 whatever v_b
        if step == 0:
            (_, s0, alpha0), drawn0 = baara.decisions[0][0], baara.keep_now  # step 0's state, alpha, keep
        if step == 1:  # batch 0 ran at the initial keep, which no decision drew: nothing to credit
            assert torch.equal(baara.heads['keep'], torch.zeros_like(baara.heads['keep']))
            assert baara.probs('alpha', s0)[alpha0] > 1 / len(B.ALPHAS)  # batch 0's +1000 raised its alpha
        if v is not None:
            baara.value = torch.tensor(v, dtype=torch.float64)
    # batch 1 ran at keep drawn0, drawn from s0: its -1000 lowers drawn0 there, a move along (s0, 1) alone
    assert baara.probs('keep', s0)[drawn0] < 0.5
    row = baara.heads['keep'][drawn0]
    assert torch.allclose(row, row[-1] * torch.cat([s0, s0.new_ones(1)]), rtol=1e-12, atol=0)  # fp64, one update: 2 roundings apart


@pytest.mark.parametrize('scope', ['all', 'top'])
def test_value_is_the_first_order_decrease_of_a_projected_step(scope, monkeypatch):
    """SGD, the reference batch = the training batch: eq. 69 moves theta by -alpha eta P_S(g), so
    eq. 65 gives v = alpha eta |P_S(g)|^2 (C_b = 1 with the units off)."""
    monkeypatch.setattr(B, 'REF_FRACTION', 1.0)  # g_ref from the whole batch
    model, (x, y) = tiny_model(), fixed_batch()
    baara = BAARA(model, [1] * 11, 0, lambda g: (x, y), cost='flops')
    baara.heads['scope'][:, -1] = torch.tensor([50.0, 0.0] if scope == 'all' else [0.0, 50.0])  # force the scope
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    baara.start()
    logits, loss = model(x, y)
    baara.observe(logits, y, loss)
    loss.backward()
    full = [p.grad.clone() for p in baara.params]
    baara.act(optimizer, 0.01)
    assert baara.last['scope'] == scope and baara.last['C'] == 1.0
    active = [g for g, p in zip(full, baara.params) if p.grad is not None]
    assert len(active) < len(full) if scope == 'top' else len(active) == len(full)
    optimizer.step()
    baara.finish()
    expected = baara.last['alpha'] * 0.01 * sum((g.double() ** 2).sum() for g in active)
    assert baara.value.item() == pytest.approx(expected.item(), rel=1e-4)  # fp32 dot of N = 13k terms, any order: 5 sqrt(N) eps32 = 3.5e-5, + theta_t's rounding <= 2.3e-6


def test_inactive_blocks_do_not_move_under_adamw():
    """Momentum and weight decay would move a block whose gradient were merely zeroed."""
    model, (x, y) = tiny_model(), fixed_batch()
    optimizer = model.configure_optimizers(0.1, 1e-2, (0.9, 0.99), 'cpu')
    baara = BAARA(model, [1] * 11, 0, lambda g: (x, y), cost='flops')
    for force in ('all', 'all', 'top', 'top'):
        baara.heads['scope'][:, -1] = torch.tensor([50.0, 0.0] if force == 'all' else [0.0, 50.0])
        lower = [p.detach().clone() for b in model.transformer.h[:2] for p in b.parameters()]
        upper = [p.detach().clone() for b in model.transformer.h[2:] for p in b.parameters()]
        moments = [optimizer.state[p]['exp_avg'].clone() for b in model.transformer.h[:2] for p in b.parameters()
                   if p in optimizer.state]
        baara.start()
        logits, loss = model(x, y)
        baara.observe(logits, y, loss)
        loss.backward()
        baara.act(optimizer, 1e-2)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        baara.finish()
        moved = lambda old, blocks: any(not torch.equal(o, p) for o, p in zip(old, (p for b in blocks for p in b.parameters())))
        assert moved(upper, model.transformer.h[2:])
        assert moved(lower, model.transformer.h[:2]) == (force == 'all')
        if force == 'top':
            now = [optimizer.state[p]['exp_avg'] for b in model.transformer.h[:2] for p in b.parameters()]
            assert all(torch.equal(a, b) for a, b in zip(moments, now))


# ---- train.py integration

def test_baara_false_never_builds_baara_and_is_the_plain_run(tmp_path, monkeypatch):
    plain = steps(run(tmp_path, 'plain'))

    def forbidden(*args, **kwargs):
        raise AssertionError('BAARA was built with baara=False')
    monkeypatch.setattr(train, 'BAARA', forbidden)
    off = steps(run(tmp_path, 'off', '--baara=False', '--baara_cost=flops'))
    assert off == plain and not any(k.startswith('baara') for r in off for k in r)


def test_resume_with_baara_reproduces_the_run(tmp_path):
    flags = ('--baara=True', '--baara_cost=flops', '--dmu_p=0.5', '--dtu_r=0.5')
    whole = steps(run(tmp_path, 'whole', *flags))
    run(tmp_path, 'half', *flags, '--max_iters=10', '--lr_decay_iters=20')  # stopped halfway
    train.main([f'--out_dir={tmp_path / "half"}', '--init_from=resume', '--max_iters=20'])
    resumed = steps(json.loads(line) for line in open(tmp_path / 'half' / 'log.jsonl'))
    assert resumed == whole
    keys = ('baara_alpha', 'baara_scope', 'baara_dmu_p', 'baara_dtu_r', 'baara_C', 'baara_value', 'baara_reward')
    assert all(k in r for r in whole for k in keys)
    assert {r['baara_dmu_p'] for r in whole} <= {0.5, 1.0} and all(r['baara_C'] > 0 for r in whole)


def test_measured_cost_runs(tmp_path):
    rows = steps(run(tmp_path, 'timed', '--baara=True', '--dmu_p=0.25', iters=12))
    assert all(math.isfinite(r['baara_C']) and r['baara_C'] > 0 for r in rows)
    assert all(r['baara_C'] == 1.0 for r in rows if r['baara_dmu_p'] == 1.0)


def test_script_answers_help_and_refuses_arguments():
    """python theorem_b1.py takes no arguments: --help or -h prints the docstring, anything else is one line,
    both at once (not after, nor instead of, the minutes of its theorem run)."""
    for flag in ('--help', '-h'):
        r = subprocess.run([sys.executable, 'theorem_b1.py', flag], cwd=ROOT, capture_output=True, text=True, timeout=30)
        assert r.returncode == 0 and r.stdout == T.__doc__.strip() + '\n' and not r.stderr, r.stderr[-2000:]
    for args in (['--foo=1'], ['config/x.py', '--seed=1']):
        r = subprocess.run([sys.executable, 'theorem_b1.py', *args], cwd=ROOT, capture_output=True, text=True, timeout=30)
        assert r.returncode == 1 and 'Traceback' not in r.stderr and r.stderr.count('\n') == 1, r.stderr[-2000:]
        assert r.stderr.startswith('error: theorem_b1.py takes no arguments; ') and not r.stdout

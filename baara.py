"""
BAARA, Batch-Aware Adaptive Resource Allocation (App. B.1-B.2, eqs. 62-69, Theorem B.1).

After each backward pass a small policy reads the batch and decides how hard, and where, the
learner updates on it, ideally by its value per unit cost (eq. 64: A_b of eq. 62 over C_b of eq.
63): s_b -> pi(a | s_b) -> a_b = (alpha_b, scope S_b, keep ratios); theta <- theta - alpha_b eta
P_S(g) (eq. 69); reward r_b = vbar_b c_b (eq. 68), REINFORCE. What the paper leaves open:
- State: FEATURES, means over micro-steps, over a running mean/std (exact for 100 steps, then EMA
  0.99; clipped to +-5). Rarity: targets' mean -log add-one unigram frequency. Fisher: log mean g^2.
- Action: alpha in ALPHAS; scope in SCOPES ('top': the upper half of the blocks; embeddings, ln_f,
  the tied head always move); keep: the configured DMU p / DTU r, or 1. Linear softmax heads, from
  uniform. Keep ratios act in the forward pass: the keep drawn at step b earns batch b+1's reward.
- P_S: the inactive blocks' gradients are set to None, so AdamW skips them (a zeroed gradient would
  still move them by momentum and decay). PSU's pull still moves every parameter.
- C_b: mean step time at the keep ratios / at keep 1, each keep's first (compiling) step untimed;
  the FLOP ratio until both are timed, and with cost='flops' (the only bit-reproducible runs).
- v_b (eq. 65) = -(g_ref . delta_theta) / C_b. g_ref: the gradient of REF_FRACTION of a fresh
  training batch (own generator, eval mode), every REF_EVERY steps (2.5% more compute). With the
  batch's own gradient, fitting its noise would pay, and theorem_b1's gap is not robust.
- vbar_b: mean of the last WINDOW v_b (eq. 66); c_b = 1 - H_b / log V (eq. 67). Only c_b v_b / W of
  r_b depends on a_b: the REINFORCE advantage is that part less its running mean, over its std.
- One host sync per step, in act() (r_b comes a step late). Every rank takes the same action.
`python baara.py` (no arguments) prints Theorem B.1 on a toy: theorem_b1 at 3 seeds, BAARA and a state-blind control.
"""
import contextlib
import copy
import math
import sys
import time

from configurator import exit_if_help

if __name__ == '__main__' and sys.argv[1:]:  # --help answers before torch is imported; nothing else starts the long run
    exit_if_help(sys.argv[1:], __doc__)
    raise SystemExit(f"error: baara.py takes no arguments; got {' '.join(sys.argv[1:])!r} (--help: what it runs)")

import numpy as np
import torch

from distributed import copy_full_, flat, is_sharded, local, mean_over_ranks_, sum_shards_, whole
from stabilize import NextTokenStats

ALPHAS = (0.25, 0.5, 1.0, 2.0)         # learning-rate factors alpha_b (eq. 69)
SCOPES = ('all', 'top')                # which blocks update: all, or the upper half
FEATURES = ('log_grad_norm', 'loss', 'loss_change', 'rarity', 'log_fisher_mean', 'log_fisher_max', 'entropy')
WINDOW = 8                             # W of eq. 66
REF_EVERY = 10                         # steps between reference gradients (eq. 65)
REF_FRACTION = 0.25                    # of a batch's sequences that the reference gradient uses
POLICY_LR = 0.05


class RunningNorm:
    """Running mean and variance: exact averages for the first 1/(1-decay) samples, then an EMA."""

    def __init__(self, n, decay):
        self.decay, self.count = decay, 0
        self.mean, self.var = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)

    def update(self, x):
        self.count += 1
        rate, delta = max(1.0 / self.count, 1.0 - self.decay), x - self.mean
        self.mean += rate * delta
        self.var = (1 - rate) * (self.var + rate * delta ** 2)
        return self

    def normalize(self, x):
        return ((x - self.mean) / (self.var.sqrt() + 1e-8)).clamp(-5, 5)


def flop_ratio(config, dmu_p, dtu_r):
    """C_b's fallback (eq. 63): matmul FLOPs per token with DMU p, DTU r over those without;
    attention projections 4C^2, MLP 8C^2 p, logits T C r, attention-values T C, head C V."""
    C, T, V = config.n_embd, config.block_size, config.vocab_size
    p = 1.0 if config.dmu_mode == 'edge' else dmu_p  # edge masks keep the matmuls dense
    flops = lambda p, r: config.n_layer * (4 * C * C + 8 * C * C * p + T * C * (r + 1)) + C * V
    return flops(p, dtu_r) / flops(1.0, 1.0)


def confidence(entropy, vocab_size):
    """c_b = 1 - H_b / log V (eq. 67): 0 for a uniform prediction, 1 for a certain one (clamped)."""
    return min(1.0, max(0.0, 1.0 - entropy / math.log(vocab_size)))


class BAARA:

    def __init__(self, model, token_counts, seed, reference, cost='time', ctx=contextlib.nullcontext()):
        """token_counts: of each token id in the training split (data.Data.token_counts), for rarity;
        reference(generator) -> (x, y): a fresh training batch, for g_ref; ctx: the training
        forward pass's autocast (g_ref in float32 would cost a bf16 GPU many times the 2.5%)."""
        config, blocks = model.config, model.transformer.h
        self.model, self.cost, self.reference, self.ctx = model, cost, reference, ctx  # as passed
        self.params = [p for p in model.parameters() if p.requires_grad]  # in the order of the flat vectors
        self.numels = [local(p).numel() for p in self.params]  # sizes of this rank's parts of the flat vectors
        self.sharded = is_sharded(self.params)  # FSDP: sums over parameters need every rank
        index = {id(p): i for i, p in enumerate(self.params)}
        self.block_params = [torch.tensor([index[id(p)] for p in b.parameters()]) for b in blocks]  # into params
        self.block_numel = [sum(p.numel() for p in b.parameters()) for b in blocks]  # for the Fisher means
        self.frozen = {'all': [], 'top': [i for b in self.block_params[:len(blocks) // 2] for i in b.tolist()]}  # P_S
        counts = np.ones(config.vocab_size)  # add-one; BERT's [MASK] id never occurs in the data
        counts[:len(token_counts)] += token_counts
        self.rarity = torch.tensor(-np.log(counts / counts.sum()), dtype=torch.float32,
                                   device=self.params[0].device)  # of each token id: -log add-one frequency
        self.keeps = list(dict.fromkeys([(config.dmu_p, config.dtu_r), (1.0, 1.0)]))  # (p, r); the last: 'off'
        self.heads = {name: torch.zeros(n, len(FEATURES) + 1, dtype=torch.float64)  # the policy; + a bias input
                      for name, n in (('alpha', len(ALPHAS)), ('scope', len(SCOPES)), ('keep', len(self.keeps)))}
        self.policy_gen = torch.Generator().manual_seed(seed + 5)  # the policy's draws, equal on every rank
        self.ref_gen = torch.Generator().manual_seed(seed + 6)  # the reference batches
        self.norm = RunningNorm(len(FEATURES), 0.99)  # of the raw state (theorem_b1's control zeroes it)
        self.baseline = RunningNorm(1, 0.95)  # of r_b's part that a_b changed: REINFORCE's baseline
        self.loss_avg = None  # running mean of the loss, for loss_change
        self.step_time = {}  # keep index -> running mean of its step time (s), for C_b
        self.warmed_up = set()  # keeps this process has stepped at; not saved: a resumed one warms up again
        self.values = []  # the last WINDOW values v_b (eq. 66)
        self.value = torch.zeros((), dtype=torch.float64, device=self.params[0].device)  # the last v_b, for act()
        self.keep_now = 0  # index of the keep ratios the model runs at (drawn at the last act())
        self.decisions = {}  # step -> [(head, s, action)], to credit with that step's r_b
        self.step, self.last = 0, {}  # steps done; the last one's action, C_b, c_b (and log's E[alpha])
        self.t_start, self.batch_sums, self.n_micro = None, 0, 0  # by start(): clock; (loss, H_b, rarity) sums, count
        self.theta_before = None  # flat theta before optimizer.step(); finish() makes it -delta_theta
        self.g_ref = self.reference_gradient()  # flat, like theta_before (eq. 65)

    def start(self):
        """Before the first forward pass: start the clock for C_b (eq. 63)."""
        self.batch_sums, self.n_micro, self.t_start = 0, 0, self.clock()

    @torch.no_grad()
    def observe(self, logits, targets, loss, entropy=None):
        """After each forward pass: loss, entropy H_b (eq. 67; given when PSU has it already), rarity."""
        weight = (targets != -1).float()
        if entropy is None:
            entropy = (NextTokenStats.apply(logits.float(), None)[..., 0] * weight).sum() / weight.sum()
        rarity = (self.rarity[targets.clamp_min(0)] * weight).sum() / weight.sum()
        self.batch_sums = self.batch_sums + torch.stack([loss.detach().float(), entropy, rarity])
        self.n_micro += 1

    @torch.no_grad()
    def act(self, optimizer, lr):
        """After the backward pass: read s_b, learn from the last r_b, draw a_b; lr = alpha_b eta, P_S (eq. 69)."""
        t_end = self.clock()
        g, loss, rarity, f_mean, f_max, entropy, v_prev = self.measure()
        self.record_time(t_end)
        if self.step > 0:
            self.learn(v_prev)
        change = 0.0 if self.loss_avg is None else loss - self.loss_avg
        self.loss_avg = loss if self.loss_avg is None else 0.9 * self.loss_avg + 0.1 * loss  # EMA, for change
        raw = torch.tensor([g, loss, change, rarity, f_mean, f_max, entropy], dtype=torch.float64)
        s = self.norm.update(raw).normalize(raw)
        alpha, scope, keep_next = (int(torch.multinomial(self.probs(name, s), 1, generator=self.policy_gen))
                                    for name in ('alpha', 'scope', 'keep'))
        self.decisions[self.step] = self.decisions.get(self.step, []) + [('alpha', s, alpha), ('scope', s, scope)]
        self.decisions[self.step + 1] = [('keep', s, keep_next)] if len(self.keeps) > 1 else []  # runs on b+1
        for group in optimizer.param_groups:
            group['lr'] = lr * ALPHAS[alpha]                                  # alpha_b * eta
        for i in self.frozen[SCOPES[scope]]:
            self.params[i].grad = None                                        # P_S (see above)
        self.theta_before = flat(self.params)                                 # for delta_theta
        self.last = dict(alpha=ALPHAS[alpha], scope=SCOPES[scope], keep=self.keeps[self.keep_now],
                         C=self.complexity(), confidence=confidence(entropy, self.model.config.vocab_size),
                         expected_alpha=(self.probs('alpha', s) @ torch.tensor(ALPHAS).double()).item())
        self.keep_now = keep_next
        self.model.set_keep_ratios(*self.keeps[keep_next])                    # for the next batch

    @torch.no_grad()
    def finish(self):
        """After optimizer.step(): v_b = -(g_ref . delta_theta) / C_b (eq. 65), read by the next act()."""
        minus_delta = self.theta_before  # theta_before - theta, in place: no parameter-sized temporaries
        torch._foreach_sub_(minus_delta.split(self.numels), [local(p.detach()).reshape(-1) for p in self.params])
        self.value = sum_shards_(torch.dot(self.g_ref, minus_delta), self.sharded).double() / self.last['C']
        self.step += 1
        if self.step % REF_EVERY == 0:
            self.g_ref = self.reference_gradient()

    def measure(self):
        """FEATURES but loss_change, and the last v_b, averaged over ranks: BAARA's one host sync per step."""
        grads = [local(p.grad) if p.grad is not None else local(p).new_zeros(()) for p in self.params]
        sq = sum_shards_(torch.stack(torch._foreach_norm(grads)) ** 2, self.sharded)  # FSDP: each rank has a part
        fisher = torch.stack([sq[ix].sum() / n for ix, n in zip(self.block_params, self.block_numel)])
        fisher = fisher.clamp_min(1e-30).log()                               # log mean g^2 of each block
        loss, entropy, rarity = self.batch_sums / self.n_micro
        packed = torch.stack([sq.sum().sqrt().log(), loss, rarity, fisher.mean(), fisher.max(), entropy,
                              self.value.to(sq)]).double()
        return mean_over_ranks_(packed).tolist()

    def record_time(self, t_end):
        """Adds the step's seconds to the running mean of keep_now, unless it is that keep's first (compile)."""
        elapsed = t_end - self.t_start if isinstance(t_end, float) else self.t_start.elapsed_time(t_end) / 1000
        if self.keep_now in self.warmed_up:
            self.step_time[self.keep_now] = 0.9 * self.step_time.get(self.keep_now, elapsed) + 0.1 * elapsed
        self.warmed_up.add(self.keep_now)

    def complexity(self):
        """C_b (eq. 63) of this step, which ran at keep ratios self.keeps[self.keep_now]."""
        k, off = self.keep_now, len(self.keeps) - 1
        if k != off and self.cost != 'flops' and k in self.step_time and off in self.step_time:
            return self.step_time[k] / self.step_time[off]
        return 1.0 if k == off else flop_ratio(self.model.config, *self.keeps[k])

    def clock(self):
        """A time stamp: perf_counter on CPU; on GPU a recorded CUDA event, read after a sync."""
        if not self.params[0].is_cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def reference_gradient(self):
        """g_ref, flat like theta_before. Through .grad (autograd.grad gives FSDP's sharded parameters
        none), so only when the step's own gradients are spent; .grad is left empty."""
        x, y = self.reference(self.ref_gen)
        n = max(1, round(len(x) * REF_FRACTION))
        self.model.eval().zero_grad(set_to_none=True)
        with torch.enable_grad():
            with self.ctx:
                loss = self.model(x[:n], y[:n])[1]
            loss.backward()
        g_ref = flat([p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params])
        self.model.train().zero_grad(set_to_none=True)
        return g_ref

    def probs(self, name, s):
        return torch.softmax(self.heads[name] @ torch.cat([s, s.new_ones(1)]), dim=0)

    def reward(self, v):
        """r_b = vbar_b c_b (eqs. 66, 68), and its part that a_b changed, c_b v_b / W (the rest came
        before a_b; W: the window's length so far)."""
        window, c = (self.values + [v])[-WINDOW:], self.last['confidence']
        return sum(window) / len(window) * c, c * v / len(window)

    def learn(self, v):
        """REINFORCE on the last step's r_b: its part that a_b changed, less its running mean, over its std."""
        _, own = self.reward(v)
        self.values = (self.values + [v])[-WINDOW:]
        adv = float(self.baseline.normalize(own)) if self.baseline.count > 1 else 0.0
        self.baseline.update(own)
        for name, s, a in self.decisions.pop(self.step - 1, []):
            grad_log_pi = -self.probs(name, s)                                # d log pi(a|s) / d logits
            grad_log_pi[a] += 1
            self.heads[name] += POLICY_LR * adv * torch.outer(grad_log_pi, torch.cat([s, s.new_ones(1)]))

    def log(self):
        """For the JSON-lines log: this step's action, C_b, v_b, c_b and r_b (a host sync)."""
        v, last = self.value.item(), self.last
        return dict(baara_alpha=last['alpha'], baara_scope=last['scope'], baara_dmu_p=last['keep'][0],
                    baara_dtu_r=last['keep'][1], baara_C=last['C'], baara_value=v, baara_confidence=last['confidence'],
                    baara_reward=self.reward(v)[0], baara_expected_alpha=last['expected_alpha'])

    def state_dict(self, saving=True):
        """All that the next steps read, g_ref whole (one tensor per parameter). Under FSDP a collective
        (gathered one parameter at a time): every rank calls it; ranks that do not save pass saving=False."""
        wholes = (whole(part, p) for part, p in zip(self.g_ref.split(self.numels), self.params))  # one at a time
        return dict(heads=self.heads, norm=self.norm, baseline=self.baseline, loss_avg=self.loss_avg, step=self.step,
                    step_time=self.step_time, values=self.values, value=self.value, keep_now=self.keep_now,
                    decisions=self.decisions, last=self.last, g_ref=[g.cpu() if saving else None for g in wholes],
                    policy_gen=self.policy_gen.get_state(), ref_gen=self.ref_gen.get_state())

    def load_state_dict(self, state):
        s = copy.deepcopy(dict(state))  # a checkpoint may be memory-mapped
        self.heads, self.norm, self.baseline, self.loss_avg = s['heads'], s['norm'], s['baseline'], s['loss_avg']
        self.step_time, self.values, self.value = s['step_time'], s['values'], s['value'].to(self.params[0].device)
        self.keep_now, self.decisions, self.step, self.last = s['keep_now'], s['decisions'], s['step'], s['last']
        self.g_ref = flat([copy_full_(torch.zeros_like(p), g) for g, p in zip(s['g_ref'], self.params)])
        self.policy_gen.set_state(s['policy_gen'])
        self.ref_gen.set_state(s['ref_gen'])
        self.model.set_keep_ratios(*self.keeps[self.keep_now])


# -----------------------------------------------------------------------------
# Theorem B.1 on a toy: `python baara.py`

def theorem_b1(seed, steps=300, noise=1 / 3, blind=False):
    """A tiny GPT trains with BAARA on the synthetic corpus, a batch noisy (uniformly random
    targets) with probability `noise`. Returns the policy's mean expected alpha on clean and on
    noisy batches over the second half. blind=True: the policy sees a zeroed state (a control)."""
    from data import get_batch, load_data
    from model import GPT, GPTConfig
    from train import train_step
    torch.manual_seed(seed)
    ids, _, tok, _, _ = load_data('synthetic', 'word', n_sentences=20_000)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=tok.vocab_size))
    optimizer = model.configure_optimizers(0.1, 3e-3, (0.9, 0.99), 'cpu')
    gen, batch = torch.Generator().manual_seed(seed), lambda g: get_batch(ids, 16, 16, g, 'cpu')
    baara, alphas = BAARA(model, np.bincount(ids), seed, batch, cost='flops'), {False: [], True: []}
    if blind:
        baara.norm.normalize = torch.zeros_like
    for step in range(steps):
        x, y = batch(gen)
        noisy = torch.rand((), generator=gen).item() < noise
        y = torch.randint(tok.vocab_size, y.shape, generator=gen) if noisy else y
        train_step(model, optimizer, lambda: (x, y), 3e-3, baara=baara, grad_clip=1.0)
        if step >= steps // 2:
            alphas[noisy].append(baara.last['expected_alpha'])
    return sum(alphas[False]) / len(alphas[False]), sum(alphas[True]) / len(alphas[True])


if __name__ == '__main__':
    torch.set_num_threads(1)
    print('| seed | policy | mean alpha, clean | mean alpha, noisy | gap |\n|---|---|---|---|---|')
    for seed in (2025, 2026, 2027):
        for blind in (False, True):
            clean, noisy = theorem_b1(seed, blind=blind)
            print(f"| {seed} | {'state zeroed' if blind else 'BAARA'} | {clean:.3f} | {noisy:.3f} | {clean - noisy:+.3f} |")

"""
BAARA, Batch-Aware Adaptive Resource Allocation (App. B.1-B.2, eqs. 62-69, Theorem B.1).

After each backward pass a small policy reads the batch and decides how hard, and where, the
learner updates on it, ideally in proportion to the batch's value per unit cost (eq. 64: the
learning accuracy A_b of eq. 62 over the complexity C_b of eq. 63): state s_b -> pi(a | s_b) ->
a_b = (alpha_b, scope S_b, keep ratios); theta <- theta - alpha_b * eta * P_S(g) (eq. 69);
reward r_b = vbar_b * c_b (eq. 68), REINFORCE. `python baara.py` shows Theorem B.1 on a toy.

The paper lost its equations in extraction; what it leaves open is chosen here:
- State: FEATURES of the batch (mean over micro-steps), each normalised by a running mean/std
  (exact for 100 steps, then EMA 0.99; clipped to +-5). Rarity: mean -log unigram frequency of
  the targets (add-one counts of the training ids). Fisher: log mean squared gradient per block.
- Action: alpha in ALPHAS; scope in SCOPES ('top': the upper half of the blocks; embeddings,
  ln_f and the tied head always move); keep = the configured DMU p / DTU r, or 1 (both off).
  Linear softmax heads, starting uniform. keep is fixed before a forward pass, so it is drawn
  for the next batch and credited with that batch's reward.
- P_S (eq. 69): the inactive blocks' gradients are set to None, so AdamW skips them: no move,
  no decay, moments untouched (a zeroed gradient would still move them by momentum and decay).
  PSU's trajectory pull (stabilize.py) still moves every parameter.
- C_b (eq. 63) = running mean of the step time (forward and backward) at its keep ratios / at
  keep 1 (untimed: each keep's first step, where torch.compile compiles its graph); the FLOP
  ratio until both are measured, and always with cost='flops', the only runs that reproduce
  bit for bit (the wall clock enters the reward).
- v_b (eq. 65) = -(g_ref . delta_theta) / C_b: the first-order decrease, by the step on batch b,
  of the loss on held-out training data. g_ref: the gradient of REF_FRACTION of a fresh training
  batch (own generator, eval mode), renewed every REF_EVERY steps (2.5% more compute, and two
  parameter-sized buffers: g_ref and theta_before). Not the batch's own gradient, which rewards
  fitting the batch, noise included: with it theorem_b1's gap is not robust.
- vbar_b = mean of the last WINDOW values (eq. 66); c_b = 1 - H_b / log V (eq. 67). The
  REINFORCE baseline: the window's older values (fixed before a_b was drawn) plus a running mean
  of the rest, over its running std; neither depends on a_b, so no bias is added.
- One host sync per step, in act() (r_b is computed a step late); on GPU, CUDA events time the
  step. Under DDP the state is averaged over ranks and the policy's generator seeded by the
  run's seed: every rank takes the same action. Under FSDP g_ref and theta_before are this
  rank's shards, and the parts of each |g_i|^2 and of v_b's dot product are summed over ranks.
"""
import contextlib
import copy
import math
import time

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
SAVED = ('heads', 'norm', 'rewards', 'loss_avg', 't_avg', 'values', 'keep', 'decisions', 'pending', 'step', 'last')


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
    """c_b = 1 - H_b / log V (eq. 67): 0 for a uniform prediction, 1 for a certain one (clamped
    to [0, 1] against float rounding)."""
    return min(1.0, max(0.0, 1.0 - entropy / math.log(vocab_size)))


class BAARA:

    def __init__(self, model, train_ids, seed, reference, cost='time', ctx=contextlib.nullcontext()):
        """reference(generator) -> (x, y): a fresh training batch, for g_ref; ctx: the training
        forward pass's autocast (g_ref in float32 would cost a bf16 GPU many times the 2.5%)."""
        self.model, self.cost, self.reference, self.ctx = model, cost, reference, ctx
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.numels = [local(p).numel() for p in self.params]  # of this rank's parts of the flat vectors
        self.sharded = is_sharded(self.params)
        blocks, index = model.transformer.h, {id(p): i for i, p in enumerate(self.params)}
        self.block_params = [torch.tensor([index[id(p)] for p in b.parameters()]) for b in blocks]
        self.block_numel = [sum(p.numel() for p in b.parameters()) for b in blocks]
        self.frozen = {'all': [], 'top': torch.cat(self.block_params[:len(blocks) // 2]).tolist()}
        counts = np.bincount(np.asarray(train_ids), minlength=model.config.vocab_size) + 1.0
        self.rarity = torch.tensor(-np.log(counts / counts.sum()), dtype=torch.float32, device=self.params[0].device)
        units = (model.config.dmu_p, model.config.dtu_r)
        self.keeps = [units, (1.0, 1.0)] if units != (1.0, 1.0) else [units]  # the last one is 'off'
        self.heads = {name: torch.zeros(n, len(FEATURES) + 1, dtype=torch.float64)  # + a bias input
                      for name, n in (('alpha', len(ALPHAS)), ('scope', len(SCOPES)), ('keep', len(self.keeps)))}
        self.gen = torch.Generator().manual_seed(seed + 5)       # the policy's draws, equal on every rank
        self.ref_gen = torch.Generator().manual_seed(seed + 6)   # the reference batches
        self.norm, self.rewards = RunningNorm(len(FEATURES), 0.99), RunningNorm(1, 0.95)
        self.loss_avg, self.t_avg, self.values = None, {}, []
        self.keep, self.decisions, self.step, self.last = 0, {}, 0, {}
        self.warm = set()  # keeps this process has stepped at; not saved: a resumed one warms up again
        self.pending = torch.zeros((), dtype=torch.float64, device=self.params[0].device)  # v_b, for act()
        self.refresh()

    # ---- the four calls of a training step: start, observe (each micro-step), act, finish

    def start(self):
        """Before the first forward pass: start the clock for C_b (eq. 63)."""
        self.micro, self.n_micro, self.t0 = 0, 0, self.clock()

    @torch.no_grad()
    def observe(self, logits, targets, loss, entropy=None):
        """After each forward pass: the loss, the predictive entropy H_b (eq. 67), token rarity.
        entropy: H_b when the caller has it already (PSU's statistics channel computes it)."""
        weight = (targets != -1).float()
        if entropy is None:
            entropy = (NextTokenStats.apply(logits.float(), None)[..., 0] * weight).sum() / weight.sum()
        rarity = (self.rarity[targets.clamp_min(0)] * weight).sum() / weight.sum()
        self.micro = self.micro + torch.stack([loss.detach().float(), entropy, rarity])
        self.n_micro, self.vocab_size = self.n_micro + 1, logits.size(-1)

    @torch.no_grad()
    def act(self, optimizer, lr):
        """After the backward pass: read the state, learn from the last reward, draw the action,
        set lr = alpha_b * eta and project the gradient onto S_b (eq. 69)."""
        t0, t1 = self.t0, self.clock()
        raw, v_prev = self.read_state()
        elapsed = t1 - t0 if isinstance(t0, float) else t0.elapsed_time(t1) / 1000  # events done: synced
        if self.step > 0:
            self.learn(v_prev)
        s = self.norm.update(raw).normalize(raw)
        alpha, scope, keep = (self.draw(name, s) for name in ('alpha', 'scope', 'keep'))
        self.decisions[self.step] = self.decisions.get(self.step, []) + [('alpha', s, alpha), ('scope', s, scope)]
        self.decisions[self.step + 1] = [('keep', s, keep)] if len(self.keeps) > 1 else []
        for group in optimizer.param_groups:
            group['lr'] = lr * ALPHAS[alpha]                                  # alpha_b * eta
        for i in self.frozen[SCOPES[scope]]:
            self.params[i].grad = None                                        # P_S (see above)
        self.theta_before = flat(self.params)                                 # for delta_theta
        self.last = dict(alpha=ALPHAS[alpha], scope=SCOPES[scope], keep=self.keeps[self.keep],
                         C=self.complexity(elapsed), confidence=confidence(raw[-1].item(), self.vocab_size),
                         expected_alpha=(self.probs('alpha', s) @ torch.tensor(ALPHAS).double()).item())
        self.keep = keep
        self.model.set_keep_ratios(*self.keeps[keep])                         # for the next batch

    @torch.no_grad()
    def finish(self):
        """After optimizer.step(): v_b = -(g_ref . delta_theta) / C_b (eq. 65), read by the next act()."""
        delta = self.theta_before  # minus theta, in place: no parameter-sized temporaries
        torch._foreach_sub_(delta.split(self.numels),
                            [local(p.detach()).reshape(-1) for p in self.params])
        decrease = torch.dot(self.g_ref, delta)
        sum_shards_(decrease, self.sharded)  # FSDP: each rank has its shards' part of the dot product
        self.pending = decrease.double() / self.last['C']
        self.step += 1
        if self.step % REF_EVERY == 0:
            self.refresh()

    def read_state(self):
        """The raw state (FEATURES) and the last step's v_b: BAARA's one host sync per step."""
        sq = torch.stack(torch._foreach_norm([local(p.grad) if p.grad is not None else local(p).new_zeros(())
                                              for p in self.params])) ** 2
        sum_shards_(sq, self.sharded)  # FSDP: each rank has its shards' part of every |g_i|^2
        fisher = torch.stack([sq[ix].sum() / n for ix, n in zip(self.block_params, self.block_numel)])
        fisher = fisher.clamp_min(1e-30).log()                               # log mean g^2 of each block
        loss, entropy, rarity = self.micro / self.n_micro
        packed = torch.stack([sq.sum().sqrt().log(), loss, rarity, fisher.mean(), fisher.max(), entropy,
                              self.pending.to(sq)]).double()
        mean_over_ranks_(packed)  # the same state, so the same action, on every rank
        g, loss, rarity, f_mean, f_max, entropy, v = packed.tolist()
        change = 0.0 if self.loss_avg is None else loss - self.loss_avg
        self.loss_avg = loss if self.loss_avg is None else 0.9 * self.loss_avg + 0.1 * loss
        return torch.tensor([g, loss, change, rarity, f_mean, f_max, entropy], dtype=torch.float64), v

    def complexity(self, elapsed):
        """C_b (eq. 63) of this step, which ran at keep ratios self.keeps[self.keep]."""
        if self.keep in self.warm:  # a keep's first step (warm-up, compile) would swamp the mean
            self.t_avg[self.keep] = 0.9 * self.t_avg.get(self.keep, elapsed) + 0.1 * elapsed
        self.warm.add(self.keep)
        off = len(self.keeps) - 1
        if self.keep == off:
            return 1.0
        if self.cost == 'flops' or off not in self.t_avg or self.keep not in self.t_avg:
            return flop_ratio(self.model.config, *self.keeps[self.keep])
        return self.t_avg[self.keep] / self.t_avg[off]

    def clock(self):
        """A time stamp: perf_counter on CPU; on GPU a recorded CUDA event, read after a sync."""
        if not self.params[0].is_cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def refresh(self):
        """g_ref, flat like theta_before. Through .grad (autograd.grad gives FSDP's sharded parameters
        none), so only when the step's own gradients are spent; .grad is left empty."""
        x, y = self.reference(self.ref_gen)
        n = max(1, round(len(x) * REF_FRACTION))
        self.model.eval()
        self.model.zero_grad(set_to_none=True)
        with torch.enable_grad():
            with self.ctx:
                loss = self.model(x[:n], y[:n])[1]
            loss.backward()
        self.g_ref = flat([p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params])
        self.model.zero_grad(set_to_none=True)
        self.model.train()

    def probs(self, name, s):
        return torch.softmax(self.heads[name] @ torch.cat([s, s.new_ones(1)]), dim=0)

    def draw(self, name, s):
        return int(torch.multinomial(self.probs(name, s), 1, generator=self.gen))

    def reward(self, v):
        """r_b = vbar_b * c_b (eq. 68); vbar_b: the mean of the last WINDOW values (eq. 66)."""
        window = (self.values + [v])[-WINDOW:]
        return sum(window) / len(window) * self.last['confidence']

    def learn(self, v):
        """REINFORCE on the last step's r_b, less its baseline (the window's older values and a
        running mean of the rest), over the rest's running std."""
        rest = self.last['confidence'] * v / min(len(self.values) + 1, WINDOW)  # r_b - the older values
        self.values = (self.values + [v])[-WINDOW:]
        adv = float(self.rewards.normalize(rest)) if self.rewards.count > 1 else 0.0
        self.rewards.update(rest)
        for name, s, a in self.decisions.pop(self.step - 1, []):
            grad_log_pi = -self.probs(name, s)                                # d log pi(a|s) / d logits
            grad_log_pi[a] += 1
            self.heads[name] += POLICY_LR * adv * torch.outer(grad_log_pi, torch.cat([s, s.new_ones(1)]))

    def log(self):
        """For the JSON-lines log: this step's action, C_b, v_b, c_b and r_b (a host sync)."""
        v, last = self.pending.item(), self.last
        return dict(baara_alpha=last['alpha'], baara_scope=last['scope'], baara_dmu_p=last['keep'][0],
                    baara_dtu_r=last['keep'][1], baara_C=last['C'], baara_value=v, baara_confidence=last['confidence'],
                    baara_reward=self.reward(v), baara_expected_alpha=last['expected_alpha'])

    # ---- checkpoints: all that the next steps read, so that a resumed run takes the same actions

    def state_dict(self, saving=True):
        """g_ref whole, one tensor per parameter. Under FSDP a collective (gathered one parameter at
        a time): every rank calls it, and ranks that do not save pass saving=False."""
        parts = self.g_ref.split(self.numels)
        wholes = (whole(part, p) for part, p in zip(parts, self.params))  # one at a time
        g_ref = [g.cpu() if saving else None for g in wholes]
        return {**{k: getattr(self, k) for k in SAVED}, 'g_ref': g_ref, 'gen': self.gen.get_state(),
                'ref_gen': self.ref_gen.get_state()}

    def load_state_dict(self, state):
        state = copy.deepcopy(dict(state))  # a checkpoint may be memory-mapped
        self.gen.set_state(state.pop('gen'))
        self.ref_gen.set_state(state.pop('ref_gen'))
        g_ref = [copy_full_(torch.zeros_like(p), g) for g, p in zip(state.pop('g_ref'), self.params)]
        vars(self).update(state)
        self.g_ref = flat(g_ref)
        self.pending = self.pending.to(self.params[0].device)
        self.model.set_keep_ratios(*self.keeps[self.keep])


# -----------------------------------------------------------------------------
# Theorem B.1 on a toy

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
    baara, alphas = BAARA(model, ids, seed, batch, cost='flops'), {False: [], True: []}
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

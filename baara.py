"""BAARA, Batch-Aware Adaptive Resource Allocation (App. B.1-B.2, eqs. 62-69; Theorem B.1: see
theorem_b1.py). After each backward pass a policy reads the batch and decides how hard, and where,
the learner updates on it, ideally by its value per unit cost (eq. 64: A_b / C_b, eqs. 62-63):
s_b -> pi(a | s_b) -> a_b = (alpha_b, scope S_b, keep ratios); theta <- theta - alpha_b eta P_S(g)
(eq. 69); r_b = vbar_b c_b (eq. 68), REINFORCE. The rest is our choice, noted where it is made."""
import math
import time
from contextlib import nullcontext

import numpy as np
import torch

from distributed import flat, is_sharded, local, mean_over_ranks_, sum_shards_
from stabilize import NextTokenStats

ALPHAS = (0.25, 0.5, 1.0, 2.0)         # learning-rate factors alpha_b (eq. 69)
SCOPES = ('all', 'top')                # all blocks, or the upper half (others always move)
FEATURES = ('log_grad_norm', 'loss', 'loss_change', 'rarity', 'log_fisher_mean', 'log_fisher_max',
            'entropy')                 # the state s_b, in this order
WINDOW = 8                             # W of eq. 66
REF_EVERY = 10                         # steps between reference gradients (eq. 65)
REF_FRACTION = 0.25                    # of a batch's sequences that the reference gradient uses
POLICY_LR = 0.05

class RunningNorm:
    """Running mean and variance: exact averages for the first 1/(1-decay) samples, then an EMA."""
    def __init__(self, n, decay):
        self.decay, self.count = decay, 0
        self.mean, self.var = (torch.zeros(n, dtype=torch.float64) for _ in range(2))

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
    def __init__(self, model, token_counts, seed, reference, cost='time', ctx=nullcontext()):
        """token_counts: per token id (rarity); reference(generator) -> a fresh batch (x, y)."""
        config, blocks = model.config, model.transformer.h
        self.model, self.cost, self.reference, self.ctx = model, cost, reference, ctx  # autocast
        self.params = [p for p in model.parameters() if p.requires_grad]  # flat vectors' order
        self.numels = [local(p).numel() for p in self.params]  # sizes of this rank's parts
        self.sharded = is_sharded(self.params)  # FSDP: sums over parameters need every rank
        index = {id(p): i for i, p in enumerate(self.params)}  # for the blocks' parameters below
        self.block_params = [torch.tensor([index[id(p)] for p in b.parameters()]) for b in blocks]
        self.block_numel = [sum(p.numel() for p in b.parameters()) for b in blocks]  # for Fisher
        lower = [i for b in self.block_params[:len(blocks) // 2] for i in b.tolist()]
        self.frozen = {'all': [], 'top': lower}  # P_S (eq. 69): the parameters a scope leaves still
        counts = np.ones(config.vocab_size)  # add-one: BERT's [MASK] id never occurs in the data
        counts[:len(token_counts)] += token_counts
        self.rarity = torch.tensor(-np.log(counts / counts.sum()), dtype=torch.float32,
                                   device=self.params[0].device)  # -log frequency, per token id
        self.keeps = list(dict.fromkeys([(config.dmu_p, config.dtu_r), (1.0, 1.0)]))  # last: off
        # the policy: a linear softmax head per decision, on (s_b, 1), from uniform (all zero)
        sizes = (('alpha', len(ALPHAS)), ('scope', len(SCOPES)), ('keep', len(self.keeps)))
        self.heads = {k: torch.zeros(n, len(FEATURES) + 1, dtype=torch.float64) for k, n in sizes}
        self.policy_gen = torch.Generator().manual_seed(seed + 5)  # same draws on every rank
        self.ref_gen = torch.Generator().manual_seed(seed + 6)  # the reference batches
        self.norm = RunningNorm(len(FEATURES), 0.99)  # of s_b (theorem_b1's control zeroes it)
        self.baseline = RunningNorm(1, 0.95)  # of r_b's part that a_b changed (REINFORCE)
        self.loss_avg = None  # running mean of the loss, for loss_change
        self.step_time = {}  # keep index -> running mean of its step time (s), for C_b
        self.warmed_up = set()  # keeps stepped at (not saved: a resumed process warms up again)
        self.values = []  # the last WINDOW values v_b (eq. 66)
        self.value = torch.zeros((), dtype=torch.float64, device=self.params[0].device)  # last v_b
        self.keep_now = 0  # index of the keep ratios the model runs at (drawn at the last act())
        self.decisions = {}  # step -> [(head, s, action)], to credit with that step's r_b
        self.step, self.last = 0, {}  # steps done; the last one's a_b, C_b, c_b and E[alpha]
        self.t_start, self.batch_sums, self.n_micro = None, 0, 0  # start()'s clock; sums, count
        self.theta_before = None  # flat theta before optimizer.step(); finish(): -delta_theta
        self.g_ref = self.reference_gradient()  # flat, like theta_before (eq. 65)

    def start(self):
        """Before the first forward pass: start the clock for C_b (eq. 63)."""
        self.batch_sums, self.n_micro, self.t_start = 0, 0, self.clock()

    @torch.no_grad()
    def observe(self, logits, targets, loss, entropy=None):
        """After each forward pass: loss, entropy H_b (eq. 67; given when PSU has it), rarity."""
        weight = (targets != -1).float()  # (B, T)
        if entropy is None:  # (B, T, V) -> per position (B, T) -> the mean over the targets
            per_position = NextTokenStats.apply(logits.float(), None)[..., 0]
            entropy = (per_position * weight).sum() / weight.sum()
        rarity = (self.rarity[targets.clamp_min(0)] * weight).sum() / weight.sum()
        self.batch_sums = self.batch_sums + torch.stack([loss.detach().float(), entropy, rarity])
        self.n_micro += 1

    @torch.no_grad()
    def act(self, optimizer, lr):
        """After the backward pass: read s_b, learn from the last r_b, draw a_b and apply it: lr =
        alpha_b eta and P_S (eq. 69) for optimizer.step(), the keep ratios for batch b+1."""
        t_end = self.clock()
        g, loss, rarity, f_mean, f_max, entropy, v_prev = self.measure()
        self.record_time(t_end)
        if self.step > 0:  # REINFORCE on r_{b-1} (eq. 68), now that v_{b-1} (eq. 65) is in
            self.learn(v_prev)
        change = 0.0 if self.loss_avg is None else loss - self.loss_avg
        self.loss_avg = loss if self.loss_avg is None else 0.9 * self.loss_avg + 0.1 * loss
        raw = torch.tensor([g, loss, change, rarity, f_mean, f_max, entropy], dtype=torch.float64)
        s = self.norm.update(raw).normalize(raw)  # s_b: FEATURES over running mean and std, (7,)
        # a_b ~ pi(a | s_b); the keep acts in the forward pass: on batch b+1, earning r_{b+1}
        alpha, scope, keep_next = (
            int(torch.multinomial(self.probs(name, s), 1, generator=self.policy_gen))
            for name in ('alpha', 'scope', 'keep'))
        self.decisions.setdefault(self.step, []).extend([('alpha', s, alpha), ('scope', s, scope)])
        self.decisions[self.step + 1] = [('keep', s, keep_next)] if len(self.keeps) > 1 else []
        # eq. 69 in optimizer.step(): lr = alpha_b eta; P_S sets the inactive blocks' gradients
        # to None: AdamW skips them (momentum and decay would move a zeroed one; PSU's pull will)
        for group in optimizer.param_groups:
            group['lr'] = lr * ALPHAS[alpha]
        for i in self.frozen[SCOPES[scope]]:
            self.params[i].grad = None
        self.theta_before = flat(self.params)  # for delta_theta (eq. 65)
        # the step's record: a_b, C_b (eq. 63), c_b (eq. 67) and E[alpha], for log()
        c_b = confidence(entropy, self.model.config.vocab_size)
        expected_alpha = (self.probs('alpha', s) @ torch.tensor(ALPHAS).double()).item()
        self.last = dict(alpha=ALPHAS[alpha], scope=SCOPES[scope], keep=self.keeps[self.keep_now],
                         C=self.complexity(), confidence=c_b, expected_alpha=expected_alpha)
        self.keep_now = keep_next
        self.model.set_keep_ratios(*self.keeps[keep_next])

    @torch.no_grad()
    def finish(self):
        """After optimizer.step(): v_b, the first-order decrease of the reference loss per cost."""
        # eq. 65: v_b = -(g_ref . delta_theta) / C_b; theta_before - theta in place (no temporaries)
        theta = [local(p.detach()).reshape(-1) for p in self.params]
        torch._foreach_sub_(self.theta_before.split(self.numels), theta)  # now -delta_theta
        dot = sum_shards_(torch.dot(self.g_ref, self.theta_before), self.sharded)
        self.value = dot.double() / self.last['C']
        self.step += 1
        if self.step % REF_EVERY == 0:
            self.g_ref = self.reference_gradient()

    def measure(self):
        """FEATURES but loss_change, and the last v_b, averaged over ranks: the one host sync."""
        grads = [local(p).new_zeros(()) if p.grad is None else local(p.grad) for p in self.params]
        sq = sum_shards_(torch.stack(torch._foreach_norm(grads)) ** 2, self.sharded)  # ||g||^2 each
        blocks = zip(self.block_params, self.block_numel)  # Fisher: log mean g^2 of each block
        fisher = torch.stack([sq[ix].sum() / n for ix, n in blocks]).clamp_min(1e-30).log()
        loss, entropy, rarity = self.batch_sums / self.n_micro
        packed = torch.stack([sq.sum().sqrt().log(), loss, rarity, fisher.mean(), fisher.max(),
                              entropy, self.value.to(sq)]).double()
        return mean_over_ranks_(packed).tolist()

    def record_time(self, t_end):
        """Adds the step's seconds to keep_now's mean unless it is its first (compiling) step."""
        k, t0 = self.keep_now, self.t_start
        elapsed = t_end - t0 if isinstance(t_end, float) else t0.elapsed_time(t_end) / 1000
        if k in self.warmed_up:
            self.step_time[k] = 0.9 * self.step_time.get(k, elapsed) + 0.1 * elapsed
        self.warmed_up.add(k)

    def complexity(self):
        """C_b (eq. 63): the step times' ratio, else (cost='flops': bit-reproducible) FLOPs'."""
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
        """g_ref (eq. 65) of a fresh batch (the batch's own would pay for fitting noise), under ctx;
        via .grad (autograd.grad gives FSDP's shards none), so once .grad is spent; left empty."""
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
        """r_b's one definition: (r_b, its part that a_b changed) for v_b = v; log(), learn()."""
        # eq. 66: vbar_b, the mean of the last W values (W: the window's length so far)
        window, c = (self.values + [v])[-WINDOW:], self.last['confidence']
        # eq. 68: r_b = vbar_b c_b; a_b changed v_b alone (the rest came before): c_b v_b / W
        return sum(window) / len(window) * c, c * v / len(window)

    def learn(self, v):
        """REINFORCE on the last step's r_b (eq. 68)."""
        _, own = self.reward(v)
        self.values = (self.values + [v])[-WINDOW:]
        # the advantage: r_b's part that a_b changed, less its running mean, over its std
        adv = float(self.baseline.normalize(own)) if self.baseline.count > 1 else 0.0
        self.baseline.update(own)
        # each credited head: logits = head @ (s, 1), d log pi(a | s) / d logits = onehot(a) - pi
        for name, s, a in self.decisions.pop(self.step - 1, []):
            grad_log_pi = -self.probs(name, s)
            grad_log_pi[a] += 1
            inputs = torch.cat([s, s.new_ones(1)])
            self.heads[name] += POLICY_LR * adv * torch.outer(grad_log_pi, inputs)

    def log(self):
        """For the JSON-lines log: this step's action, C_b, v_b, c_b and r_b (a host sync)."""
        v, last = self.value.item(), self.last
        return dict(baara_alpha=last['alpha'], baara_scope=last['scope'],
                    baara_dmu_p=last['keep'][0], baara_dtu_r=last['keep'][1], baara_C=last['C'],
                    baara_value=v, baara_confidence=last['confidence'],
                    baara_reward=self.reward(v)[0], baara_expected_alpha=last['expected_alpha'])

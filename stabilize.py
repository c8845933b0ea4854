"""PSU, the feedback loop that stabilises training (Sec. 6.1), and Definition 3.1's diagnostics.

The paper never writes PSU down: a first-order negative feedback system (eq. 61),
x_{t+1} = x_t - eta * lambda * F(x_t) + xi_t, that "stabilises internal generation statistics" and
"biases parameter trajectories toward asymptotic boundedness and vanishing gradients". Our reading
builds those two things, as two channels sharing one gain lambda:
1. stats (PSU.feedback_loss): a loss term, a P-controller on statistics s_t of the training
   forward pass: its gradient is a force proportional to each one's error from its EMA r_t.
2. params (PSU.pull): after each optimiser step theta <- theta - lambda * (theta - theta_bar),
   theta_bar the parameters' EMA: the pull that bounds the trajectory (Def. 3.1, 1-3).
3. data (FedBack): a share lambda of each batch's rows is the model's own generated text: the
   loop closed through the data (self-consuming training, "model collapse"; see FedBack).
lambda = 0 switches all off and train.py then never calls them: bit-identical to no PSU.
"""
import math

import torch
import torch.nn.functional as F

from data import get_batch, join_rows
from distributed import full_tensor
from sample import prompt_ids, sample_ids

SCALE_FLOOR = 0.05  # of scale_t: a statistic that has not moved yet is not divided by ~0


class PSU:
    def __init__(self, params, lam, beta, channels, eot, fed_back=None):
        on = set(channels.replace('both', 'stats+params').split('+'))  # e.g. 'both+data'
        self.lam, self.beta, self.eot = lam, beta, eot
        self.stats_on, self.params_on = lam > 0 and 'stats' in on, lam > 0 and 'params' in on
        self.fed_back = fed_back if lam > 0 and 'data' in on else None  # a FedBack, or None
        self.params = [p for p in params if p.requires_grad]
        self.names = ['entropy', 'log_partition'] + (['eot_prob'] if eot is not None else [])
        self.ref = self.var = None  # r_t, scale_t^2: made at the first step; ema: theta_bar
        self.ema = [p.detach().clone() for p in self.params] if self.params_on else None
        self.last = {}  # detached tensors for the log; turned into numbers only when logged

    def statistics(self, logits, targets):
        """s_t: predictive entropy, log-partition, end-of-text probability, each averaged over
        the positions that have a target (all for GPT; the masked ones for BERT)."""
        stats = NextTokenStats.apply(logits.float(), self.eot)  # (B, T, n), fp32 under autocast too
        weight = (targets != -1).float().unsqueeze(-1)  # (B, T, 1)
        return (stats * weight).sum((0, 1)) / weight.sum().clamp_min(1)  # (n,)

    def feedback_loss(self, logits, targets):
        """The statistics channel (eq. 61): the term train_step adds to the loss; updates r_t."""
        s = self.statistics(logits, targets)  # (n,), with gradient
        if self.ref is None:
            self.ref, self.var = s.detach().clone(), torch.ones_like(s)  # r_0 = s_0, scale_0 = 1
        # eq. 61: lambda * sum_k (error_k / scale_k)^2, whose gradient pushes s_t back toward r_t
        error = s - self.ref
        scale = self.var.sqrt().clamp_min(SCALE_FLOOR)
        loss = self.lam * ((error / scale) ** 2).sum()
        # then the references follow: EMAs (decay beta) of the squared error and of s_t
        with torch.no_grad():
            self.var.lerp_(error.detach() ** 2, 1 - self.beta)
            self.ref.lerp_(s.detach(), 1 - self.beta)
        self.last.update(stats=s.detach(), ref=self.ref.clone(), feedback_loss=loss.detach())
        return loss

    @torch.no_grad()
    def pull(self, measure=False):
        """The parameter channel (eq. 61), after optimizer.step(); measure=True on logged steps."""
        # theta_bar <- theta_bar + (1 - beta) (theta - theta_bar): the parameters' EMA
        torch._foreach_lerp_(self.ema, self.params, 1 - self.beta)
        if measure:
            diffs = (e - p for e, p in zip(self.ema, self.params))  # one parameter at a time
            self.last['pull_norm'] = self.lam * global_norm(diffs)
        # theta <- theta + lambda (theta_bar - theta): the pull that bounds the trajectory
        torch._foreach_lerp_(self.params, self.ema, self.lam)

    def pending_pull(self, theta, theta_bar):
        """What pull() will add to theta (a piece of a parameter; theta_bar: its EMA's piece)."""
        return theta_bar.lerp(theta, 1 - self.beta).sub_(theta).mul_(self.lam)

    def log(self):
        """Numbers for the JSON-lines log (this is the only place PSU syncs with the device)."""
        out = {}
        if 'stats' in self.last:
            stats, refs = self.last['stats'].tolist(), self.last['ref'].tolist()
            for name, s, r in zip(self.names, stats, refs):
                out[f'psu_{name}'], out[f'psu_ref_{name}'] = s, r
            out['psu_feedback_loss'] = self.last['feedback_loss'].item()
        if 'pull_norm' in self.last:
            out['psu_pull_norm'] = self.last['pull_norm'].item()
        if self.fed_back:
            out.update(psu_fed_rows=self.fed_back.fed_rows, psu_generated=self.fed_back.generated)
        return out


class FedBack:
    """PSU's data channel, our third reading of eq. 61's loop: the model's own text fed back into
    its data (self-consuming training: Shumailov et al. 2024, Alemohammad et al. 2024). From
    warmup_iters on, every psu_data_every steps, the model writes rows of block_size tokens with
    the run's decoder (sample.sample_ids), joined into one stream as the corpus is (join_rows);
    till the next refresh, round(lambda * batch_size) rows of each batch are windows of it, in
    place of corpus rows: every batch keeps a share 1 - lambda of real data."""

    def __init__(self, lam, c, tok, rank, ctx):
        self.c, self.tok, self.ctx = c, tok, ctx
        self.rows = round(lam * c['batch_size'])  # fed back in each batch once the loop runs
        self.gen = torch.Generator().manual_seed(c['seed'] + rank + 9)  # windows; sampling seeds
        self.stream, self.generated = None, 0  # the model's text (ids); rows generated so far

    @property
    def fed_rows(self):  # the rows of each batch that come from the stream now
        return self.rows if self.stream is not None else 0

    @torch.no_grad()
    def refresh(self, model, iter_num):
        """At warmup_iters and every psu_data_every steps after: the model writes the stream
        anew, rows enough for the windows of the steps until the next refresh."""
        c, T, start = self.c, self.c['block_size'], self.c['warmup_iters']
        if iter_num < start or (iter_num - start) % c['psu_data_every'] or not self.rows:
            return
        n = math.ceil(c['psu_data_every'] * self.rows * (T + 1) / T)
        seed = int(torch.randint(2 ** 62, (), generator=self.gen))
        decoder = {k: c[k] for k in ('temperature', 'top_k', 'top_p')}
        with self.ctx:
            rows = sample_ids(model, self.tok, n, T, device=c['device'], seed=seed,
                              batch_size=512, **decoder)
        sep = prompt_ids(self.tok, '')[-1] if model.config.causal else None  # end-of-text
        self.stream, self.generated = join_rows(rows, sep, T + 2), self.generated + n

    def windows(self, device):
        """(x, y), (rows, block_size) each: next-token pairs of the stream, as data.get_batch's."""
        return get_batch(self.stream, self.rows, self.c['block_size'], self.gen, device)


class NextTokenStats(torch.autograd.Function):
    """Per position, from logits z (fp32): entropy H = -sum_j p_j log p_j, log Z and p_eot (when eot
    is not None), stacked last. The backward pass is written out, 2-3x faster than autograd's:
        dH/dz = -p * (log p + H),   dlogZ/dz = p,   dp_eot/dz = p_eot * (onehot(eot) - p)."""

    @staticmethod
    def forward(ctx, logits, eot):
        # (..., V) each; 2 kernels beat exp(log_p)
        log_p, p = F.log_softmax(logits, dim=-1), F.softmax(logits, dim=-1)
        entropy = -(p * log_p).sum(-1)  # (...,); not linalg.vecdot: autocast would run it in bf16
        log_z = logits[..., 0] - log_p[..., 0]  # (...,): log p_j = z_j - log Z, at any j
        ctx.save_for_backward(p, log_p, entropy)
        ctx.eot = eot
        stats = [entropy, log_z] + ([p[..., eot]] if eot is not None else [])
        return torch.stack(stats, dim=-1)  # (..., 2 or 3)

    @staticmethod
    def backward(ctx, grad):
        p, log_p, entropy = ctx.saved_tensors
        g_h, g_z = grad[..., 0:1], grad[..., 1:2]  # (..., 1) each, from grad (..., 2 or 3)
        coef = g_z - g_h * entropy.unsqueeze(-1)  # the terms that multiply p alone
        if ctx.eot is not None:
            g_eot = grad[..., 2:3] * p[..., ctx.eot:ctx.eot + 1]
            coef = coef - g_eot
        grad_logits = torch.addcmul(coef, g_h, log_p, value=-1).mul_(p)  # (..., V)
        if ctx.eot is not None:
            grad_logits[..., ctx.eot:ctx.eot + 1] += g_eot  # dp_eot/dz's onehot(eot) term
        return grad_logits, None


def global_norm(tensors):
    """||concat(tensors)||_2, 0-dim (no host sync), over FSDP's shards; one tensor at a time."""
    norms = torch.stack([torch.linalg.vector_norm(t) for t in tensors])
    return full_tensor(torch.linalg.vector_norm(norms))


class Diagnostics:
    """Definition 3.1, measured at every eval: ||theta|| now, ||g|| of the step just taken and the
    latest logged step's ||theta_t - theta_{t-1}|| (an eval right after a logged step repeats it),
    and the loss curve's roughness: std of the logged loss's steps over its mean (not judged)."""

    def __init__(self):
        self.records = []

    def record(self, iter_num, param_norm, grad_norm, update_norm, losses):
        diffs = [b - a for a, b in zip(losses[:-1], losses[1:])]
        roughness = (std(diffs) / (sum(losses) / len(losses))) if len(diffs) > 1 else None
        row = dict(iter=iter_num, param_norm=param_norm, grad_norm=grad_norm,
                   update_norm=update_norm, loss_roughness=roughness)
        self.records.append(row)
        return row

    def verdict(self):
        """'stable' when Def. 3.1's three conditions hold over the last half of the records."""
        tail = self.records[len(self.records) // 2:]
        if len(tail) < 2 or len(self.records) < 4:
            return {'verdict': 'undetermined', 'reason': f'{len(self.records)} evals, need 4'}
        # (1) bounded: the last half's largest ||theta|| <= 1.1 x its first (1.1: our threshold)
        growth = max(r['param_norm'] for r in tail) / tail[0]['param_norm']
        bounded = growth <= 1.1
        # (2) vanishing gradients: log ||g||'s least-squares slope per record is <= 0
        grad_slope = slope([math.log(max(r['grad_norm'], 1e-30)) for r in tail])
        # (3) vanishing updates: the same for log ||theta_t - theta_{t-1}||
        update_slope = slope([math.log(max(r['update_norm'], 1e-30)) for r in tail])
        stable = bounded and grad_slope <= 0 and update_slope <= 0
        return {'verdict': 'stable' if stable else 'not stable', 'param_norm_bounded': bounded,
                'param_norm_growth': growth, 'grad_norm_slope': grad_slope,
                'update_norm_slope': update_slope, 'loss_roughness': tail[-1]['loss_roughness']}

    def state_dict(self):
        return {'records': self.records}

    def load_state_dict(self, state):
        self.records = list(state['records'])


def slope(ys):
    n = len(ys)
    xm, ym = (n - 1) / 2, sum(ys) / n
    return sum((i - xm) * (y - ym) for i, y in enumerate(ys)) / sum((i - xm) ** 2 for i in range(n))


def std(xs):
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / len(xs))


def param_norm(params):
    return global_norm([p.detach() for p in params])

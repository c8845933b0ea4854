"""
PSU: the feedback loop that stabilises training (Sec. 6.1), and the stability diagnostics of
Definition 3.1.

The paper never writes PSU down; it is a first-order negative feedback system (eq. 61)

    x_{t+1} = x_t - eta * lambda * F(x_t) + xi_t

that "stabilises internal generation statistics" and "biases parameter trajectories toward
asymptotic boundedness and vanishing gradients". We build exactly those two things, as two
channels sharing one gain lambda (the paper leaves the rest open; this is our reading):

1. stats: s_t = (mean predictive entropy, mean log-partition, mean end-of-text probability) of
   the training forward pass, with gradient. r_t = EMA of the detached s (decay beta, r_0 = s_0).
   Added to the loss: lambda * sum_k ((s_t,k - r_t,k) / scale_k)^2, scale_k the running std of
   s_k - r_k (EMA of its square, same beta, started at 1, floor 0.05). Its gradient is a force
   proportional to each statistic's error: a P-controller, eq. 61 with F = d/dx of that loss.
2. params: after each optimiser step, theta <- theta - lambda * (theta - theta_bar), theta_bar
   the EMA of the parameters (decay beta): the pull that bounds the trajectory (Def. 3.1, 1-3).

lambda = 0 switches both off and train.py then never calls them: bit-identical to no PSU.
"""
import math
from itertools import repeat

import torch
import torch.nn.functional as F
from torch.optim.adamw import adamw

from distributed import copy_full_, full_tensor, gather_to_cpu, is_sharded, pieces, sum_shards_

SCALE_FLOOR = 0.05
# Elements the logged step's measurements hold at a time (1 MiB in fp32): whole SIMD vectors, as fused AdamW
# rounds a call's leftover tail apart, and pieces must step bit for bit as one whole step.
PIECE = 1 << 18


class PSU:

    def __init__(self, params, lam, beta, channels, eot):
        assert channels in ('stats', 'params', 'both'), channels
        self.lam, self.beta, self.eot = lam, beta, eot
        self.stats_on = lam > 0 and channels in ('stats', 'both')
        self.params_on = lam > 0 and channels in ('params', 'both')
        self.params = [p for p in params if p.requires_grad]
        self.names = ['entropy', 'log_partition'] + (['eot_prob'] if eot is not None else [])
        self.ref = self.var = None  # statistics channel state, made at the first step
        self.ema = [p.detach().clone() for p in self.params] if self.params_on else None
        self.last = {}  # detached tensors for the log; turned into numbers only when logged

    def statistics(self, logits, targets):
        """s_t: predictive entropy, log-partition, end-of-text probability, each averaged over
        the positions that have a target (all for GPT; the masked ones for BERT)."""
        stats = NextTokenStats.apply(logits.float(), self.eot)  # (B, T, 2 or 3), fp32 also under autocast
        weight = (targets != -1).float().unsqueeze(-1)
        return (stats * weight).sum((0, 1)) / weight.sum().clamp_min(1)

    def feedback_loss(self, logits, targets):
        """The statistics channel's loss term (eq. 61); updates the reference afterwards."""
        s = self.statistics(logits, targets)
        if self.ref is None:
            self.ref, self.var = s.detach().clone(), torch.ones_like(s)
        error = s - self.ref
        scale = self.var.sqrt().clamp_min(SCALE_FLOOR)
        loss = self.lam * ((error / scale) ** 2).sum()
        with torch.no_grad():
            self.var.lerp_(error.detach() ** 2, 1 - self.beta)
            self.ref.lerp_(s.detach(), 1 - self.beta)
        self.last.update(stats=s.detach(), ref=self.ref.clone(), feedback_loss=loss.detach())
        return loss

    @torch.no_grad()
    def pull(self, measure=False):
        """The parameter channel: move theta_bar toward theta, then theta toward theta_bar.
        measure=True (logged steps) also keeps the pull's norm lambda * ||theta_bar - theta||, one
        parameter's difference at a time; step_measuring_update has measured the pull before (pending_pull)."""
        torch._foreach_lerp_(self.ema, self.params, 1 - self.beta)
        if measure:
            self.last['pull_norm'] = self.lam * global_norm(e - p for e, p in zip(self.ema, self.params))
        torch._foreach_lerp_(self.params, self.ema, self.lam)  # theta + lambda * (theta_bar - theta)

    def pending_pull(self, theta, theta_bar):
        """What pull() will add to theta (a piece of a parameter, its EMA's piece theta_bar): lambda (theta_bar' - theta)."""
        return theta_bar.lerp(theta, 1 - self.beta).sub_(theta).mul_(self.lam)

    def log(self):
        """Numbers for the JSON-lines log (this is the only place PSU syncs with the device)."""
        out = {}
        if 'stats' in self.last:
            for name, s, r in zip(self.names, self.last['stats'].tolist(), self.last['ref'].tolist()):
                out[f'psu_{name}'], out[f'psu_ref_{name}'] = s, r
            out['psu_feedback_loss'] = self.last['feedback_loss'].item()
        if 'pull_norm' in self.last:
            out['psu_pull_norm'] = self.last['pull_norm'].item()
        return out

    def state_dict(self, saving=True):
        """'ref', 'var': this rank's statistics reference, on the CPU (each rank sees its own batches,
        so a checkpoint keeps one per rank); 'ema': the parameter EMA whole, on the CPU (under FSDP
        a collective: see distributed.gather_to_cpu)."""
        ref, var = (None if t is None else t.cpu() for t in (self.ref, self.var))
        ema = None if self.ema is None else gather_to_cpu(self.ema, saving)
        return {'ref': ref, 'var': var, 'ema': ema}

    def load_state_dict(self, state):
        device = self.params[0].device
        self.ref, self.var = (None if t is None else t.to(device, copy=True) for t in (state['ref'], state['var']))
        if self.params_on and state['ema'] is not None:
            for e, s in zip(self.ema, state['ema']):
                copy_full_(e, s)


class NextTokenStats(torch.autograd.Function):
    """Per position, from logits z (fp32): the entropy H = -sum_j p_j log p_j, log Z, and p_eot
    (when eot is not None), stacked on the last dimension. The backward pass is written out, so
    that autograd does not replay each step of the forward one (2-3x faster than autograd's):
        dH/dz = -p * (log p + H),   dlogZ/dz = p,   dp_eot/dz = p_eot * (onehot(eot) - p)."""

    @staticmethod
    def forward(ctx, logits, eot):
        log_p, p = F.log_softmax(logits, dim=-1), F.softmax(logits, dim=-1)  # 2 kernels beat exp(log_p)
        entropy = -(p * log_p).sum(-1)  # not linalg.vecdot: autocast would run that in bf16
        log_z = logits[..., 0] - log_p[..., 0]  # log p_j = z_j - log Z, at any j
        ctx.save_for_backward(p, log_p, entropy)
        ctx.eot = eot
        stats = [entropy, log_z] + ([p[..., eot]] if eot is not None else [])
        return torch.stack(stats, dim=-1)

    @staticmethod
    def backward(ctx, grad):
        p, log_p, entropy = ctx.saved_tensors
        g_h, g_z = grad[..., 0:1], grad[..., 1:2]
        coef = g_z - g_h * entropy.unsqueeze(-1)                # the terms that multiply p alone
        if ctx.eot is not None:
            g_eot = grad[..., 2:3] * p[..., ctx.eot:ctx.eot + 1]
            coef = coef - g_eot
        grad_logits = torch.addcmul(coef, g_h, log_p, value=-1).mul_(p)
        if ctx.eot is not None:
            grad_logits[..., ctx.eot:ctx.eot + 1] += g_eot
        return grad_logits, None


def global_norm(tensors):
    """||concat(tensors)||_2, 0-dim (no host sync), over FSDP's shards; from a generator, one tensor at a time."""
    return full_tensor(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in tensors])))


class Diagnostics:
    """Definition 3.1, measured: ||theta_t|| (bounded), ||g_t|| -> 0, ||theta_t - theta_{t-1}|| -> 0, plus the
    smoothness of the loss curve. record() is called at every eval with ||theta|| now, ||g|| of the step just
    taken and the update norm of the latest logged step (measured every log_interval steps only: an eval right
    after a logged step repeats it). verdict() judges the last half of the records (at least 4 are needed):
    the run is "stable" when
      (1) bounded: the largest parameter norm in the last half is at most 1.1 x the first (param_norm_growth);
      (2) vanishing gradients: the gradient-norm trend (least-squares slope of log ||g|| per record) over the
          last half is <= 0;
      (3) vanishing updates: the same for log ||theta_t - theta_{t-1}||.
    Smoothness is reported beside it: the std of consecutive differences of the logged training loss over the
    last half, divided by its mean (small = smooth); it does not enter the verdict."""

    def __init__(self):
        self.records = []

    def record(self, iter_num, param_norm, grad_norm, update_norm, losses):
        diffs = [b - a for a, b in zip(losses[:-1], losses[1:])]
        roughness = (std(diffs) / (sum(losses) / len(losses))) if len(diffs) > 1 else None
        row = dict(iter=iter_num, param_norm=param_norm, grad_norm=grad_norm, update_norm=update_norm,
                   loss_roughness=roughness)
        self.records.append(row)
        return row

    def verdict(self):
        tail = self.records[len(self.records) // 2:]
        if len(tail) < 2 or len(self.records) < 4:
            return {'verdict': 'undetermined', 'reason': f'{len(self.records)} evals, need 4'}
        norms = [r['param_norm'] for r in tail]
        growth = max(norms) / norms[0]
        bounded = growth <= 1.1
        grad_slope = slope([math.log(max(r['grad_norm'], 1e-30)) for r in tail])
        update_slope = slope([math.log(max(r['update_norm'], 1e-30)) for r in tail])
        stable = bounded and grad_slope <= 0 and update_slope <= 0
        return {'verdict': 'stable' if stable else 'not stable', 'param_norm_bounded': bounded, 'param_norm_growth': growth,
                'grad_norm_slope': grad_slope, 'update_norm_slope': update_slope,
                'loss_roughness': tail[-1]['loss_roughness']}

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


@torch.no_grad()
def step_measuring_update(optimizer, psu=None):
    """optimizer.step() (bit for bit; tested) that also returns ||theta_t - theta_{t-1}|| (Def. 3.1) and PSU's
    pull to come (pending_pull), with no parameter copy: each piece's difference is taken while in cache.
    Gradients mark what AdamW moves (BAARA's P_S drops some); under FSDP the squares add up over the ranks."""
    theta_bar = dict(zip(psu.params, psu.ema)) if psu is not None and psu.params_on else {}
    squares = []
    for group in optimizer.param_groups:
        for p in group['params']:
            if p.grad is None and p not in theta_bar:
                continue  # neither AdamW nor PSU moves it
            steps = adamw_pieces(optimizer, group, p) if p.grad is not None else ((t, None) for t in pieces(p, PIECE))
            bars = pieces(theta_bar[p], PIECE) if p in theta_bar else repeat(None)
            for (theta, d), bar in zip(steps, bars):
                if bar is not None:
                    pull = psu.pending_pull(theta, bar)
                    d = pull if d is None else d.add_(pull)
                squares.append(torch.dot(d, d))  # ~1e-7 relative (a whole-tensor vector_norm: 3e-3 at 38M elements)
    return sum_shards_(torch.stack(squares).sum(), is_sharded(optimizer.param_groups[0]['params'])).sqrt()


def adamw_pieces(optimizer, group, p):
    """Step p as optimizer.step() would (torch's functional AdamW, the group's settings), PIECE elements at a
    time; yields each piece theta_t and theta_t - theta_{t-1} (in one PIECE-sized buffer, reused)."""
    assert not group['amsgrad'], "train.py's AdamW keeps no max_exp_avg_sq"
    state = optimizer.state[p]
    if not state:  # AdamW's first step: its state, made as torch.optim.AdamW makes it
        on_device = group['fused'] or group['capturable']
        state.update(step=torch.zeros((), dtype=torch.float32, device=p.device if on_device else 'cpu'),
                     exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
    step, (beta1, beta2) = state['step'].clone(), group['betas']  # each piece's call adds 1 to its own copy
    state['step'].add_(1)  # the state counts the step once
    buffer = None
    for theta, g, m, v in zip(*(pieces(t, PIECE) for t in (p, p.grad, state['exp_avg'], state['exp_avg_sq']))):
        buffer = torch.empty_like(theta) if buffer is None else buffer  # the first piece is the longest
        before = buffer[:theta.numel()].copy_(theta)  # theta_{t-1}
        adamw([theta], [g], [m], [v], [], [step.clone()], foreach=group['foreach'], fused=group['fused'], amsgrad=False,
              capturable=group['capturable'], differentiable=group['differentiable'], beta1=beta1, beta2=beta2,
              lr=group['lr'], weight_decay=group['weight_decay'], eps=group['eps'], maximize=group['maximize'])
        yield theta, torch.sub(theta, before, out=before)  # theta_t - theta_{t-1}


def param_norm(params):
    return global_norm([p.detach() for p in params])

"""Hand-written GPT-2 and BERT in one file, with the paper's two stochastic units. GPT-2:
pre-LayerNorm, learned positions, tied embeddings, tanh-GELU MLP, causal attention. BERT: the same
Block without the causal mask, trained as a masked LM (see `mask_tokens`). DMU, Dynamic MLP Unit
(App. B.3): the MLP keeps each hidden unit with retention p. DTU, Dynamic Transformer Unit
(App. B.4, eq. 142): attention logits from a score-weighted random subset of each head's dims.
With dropout=0, dmu_p=1 and dtu_r=1 the network is exactly GPT-2 (nanoGPT's names and keys)."""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50304
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True
    causal: bool = True      # False = BERT (bidirectional masked LM)
    dmu_p: float = 1.0       # DMU retention probability of MLP hidden units (1 = off)
    dmu_mode: str = 'fix'    # 'prob': Bernoulli per unit, 'fix': floor(p*n), 'edge': per weight
    dtu_r: float = 1.0       # DTU keep ratio of each head's dimensions (1 = off)


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head, self.n_embd, self.dropout = config.n_head, config.n_embd, config.dropout
        self.causal, self.dtu_r = config.causal, config.dtu_r

    def forward(self, x, cache=None):
        """x (B, T, C) -> (B, T, C); with a KVCache, x holds only the next T positions."""
        B, T, C = x.size()
        # q, k, v for all heads in one matmul, each split into heads: (B, nh, T, hs), hs = C // nh
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        # sampling: append the new keys and values to the cache and attend to all cached positions
        if cache is not None:
            k, v = cache.append(k, v)  # (B, nh, pos + T, hs)
        # DTU (eq. 142), training only: logits from a random subset of each head's dimensions
        scale = None  # SDPA's default 1/sqrt(hs)
        if self.training and self.dtu_r < 1:
            q, k = dtu_select(q, k, self.dtu_r)  # (B, nh, T, kept) each; v keeps all hs
            scale = 1.0 / math.sqrt(q.size(-1))
        # softmax(q k^T * scale) v in one fused kernel; a lone query (cached step) sees every key
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0,
                                           is_causal=self.causal and T > 1, scale=scale)
        # re-assemble the heads side by side, (B, nh, T, hs) -> (B, T, C), and project
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


def dtu_select(q, k, r):
    """DTU (App. B.4, eq. 142): q, k (B, nh, T, hs) -> the same round(r*hs) of each head's dims."""
    kept = max(1, round(r * q.size(-1)))
    with torch.no_grad():
        # compatibility score of dimension i: ||Q[:, i]|| * ||K[:, i]|| over the sequence
        score = q.norm(dim=2) * k.norm(dim=2)  # (B, nh, hs)
        # `kept` dims without replacement, P ~ score: Gumbel-top-k (Plackett-Luce), no host sync
        gumbel = -torch.log(-torch.log(torch.rand_like(score).clamp_(1e-20, 1.0)))
        idx = (score.clamp_min(1e-20).log() + gumbel).topk(kept, dim=-1).indices  # (B, nh, kept)
    idx = idx.unsqueeze(2).expand(-1, -1, q.size(2), -1)  # (B, nh, T, kept): same at every position
    return q.gather(-1, idx), k.gather(-1, idx)


class KVCache:
    """One layer's keys and values: (B, nh, block_size, hs) buffers, allocated at the first write
    in the keys' dtype (bf16 under autocast). The fill level `pos` is an int: no device wait."""
    def __init__(self, block_size):
        self.block_size, self.pos, self.k, self.v = block_size, 0, None, None

    def append(self, k, v):
        """k, v (B, nh, T, hs) of the next T positions -> all so far, (B, nh, pos + T, hs)."""
        T = k.size(2)
        assert self.pos == 0 or T == 1, "a KVCache takes a prompt, then one token at a time"
        assert self.pos + T <= self.block_size, (
            f"KVCache full: {self.pos} + {T} > block_size {self.block_size}")
        if self.k is None:
            B, nh, _, hs = k.shape
            self.k = k.new_empty(B, nh, self.block_size, hs)
            self.v = v.new_empty(B, nh, self.block_size, hs)
        self.k[:, :, self.pos:self.pos + T] = k
        self.v[:, :, self.pos:self.pos + T] = v
        self.pos += T
        return self.k[:, :, :self.pos], self.v[:, :, :self.pos]


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate='tanh')
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)
        self.dmu_p, self.dmu_mode = config.dmu_p, config.dmu_mode

    def forward(self, x):
        p = self.dmu_p
        # eval mode or DMU off: GPT-2's MLP, (B, T, C) -> (B, T, 4C) -> (B, T, C)
        if not self.training or p >= 1:
            return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))
        # DMU in training: drop single weights ('edge') or whole hidden units ('prob', 'fix')
        if self.dmu_mode == 'edge':
            return self.dropout(self.edge_forward(x, p))
        return self.dropout(self.node_forward(x, p))

    def node_forward(self, x, p):
        """DMU node-level (Def. A.4; DProb/DFix of eqs. 111-118): k of the n = 4C hidden units,
        rescaled so that the output is unbiased in expectation (Lemma B.4)."""
        n = self.c_fc.out_features
        # 'prob': each unit kept w.p. p = a uniform subset of k ~ Binomial(n, p) units (CPU draw)
        if self.dmu_mode == 'prob':
            k, scale = int(torch.binomial(torch.tensor(float(n)), torch.tensor(p))), 1.0 / p
        else:  # 'fix': exactly k = floor(p*n) units (eq. 116), scaled by n/k (1/p if p*n is whole)
            k = max(1, math.floor(p * n))
            scale = n / k
        idx = torch.randperm(n, device=x.device)[:k]
        # the saving: kept units sliced out of both weights (c_fc rows, c_proj columns), k of n wide
        b_fc = self.c_fc.bias[idx] if self.c_fc.bias is not None else None
        h = self.gelu(F.linear(x, self.c_fc.weight[idx], b_fc))  # (B, T, k)
        return F.linear(h * scale, self.c_proj.weight[:, idx], self.c_proj.bias)  # eqs. 117-118

    def edge_forward(self, x, p):
        """DMU edge-level (Def. A.3, 'DMU2'): an independent Bernoulli(p) mask on every weight of
        both matrices, rescaled by 1/p (eq. 79). Slow (two full-size masks); to teach Thm B.5."""
        w_fc = self.c_fc.weight * (torch.rand_like(self.c_fc.weight) < p) / p
        w_proj = self.c_proj.weight * (torch.rand_like(self.c_proj.weight) < p) / p
        return F.linear(self.gelu(F.linear(x, w_fc, self.c_fc.bias)), w_proj, self.c_proj.bias)


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, cache=None):
        # pre-LN residual connections: attention mixes the positions, the MLP transforms each one
        x = x + self.attn(self.ln_1(x), cache)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        assert config.vocab_size is not None and config.block_size is not None
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying
        self.init_weights()

    def init_weights(self):
        """GPT-2's init. Also re-run by distributed.build_fsdp on FSDP's local shards (DTensors)
        after a meta-device build, so that no rank ever holds the whole model."""
        self.apply(self._init_weights)
        for pn, p in self.named_parameters():  # GPT-2's scaled init of residual projections
            if pn.endswith('c_proj.weight'):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * self.config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
        elif isinstance(module, nn.LayerNorm):
            module.reset_parameters()  # ones, zeros: a no-op at construction, needed after to_empty

    def get_num_params(self):
        return sum(p.numel() for p in self.parameters())  # tied weights are counted once

    def estimate_mfu(self, tokens_per_s, peak_flops):
        """Model FLOPs utilisation as nanoGPT (PaLM App. B): 6N + 12*L*H*Q*T FLOPs per token for
        fwd + bwd, N the params less wpe, Q head size, T context; DMU/DTU skip work: understated."""
        cfg = self.config
        L, H, Q, T = cfg.n_layer, cfg.n_head, cfg.n_embd // cfg.n_head, cfg.block_size
        n = self.get_num_params() - self.transformer.wpe.weight.numel()
        return (6 * n + 12 * L * H * Q * T) * tokens_per_s / peak_flops

    def set_keep_ratios(self, dmu_p=None, dtu_r=None):
        """Change the DMU/DTU keep ratios of every block (BAARA's action does this per step)."""
        for block in self.transformer.h:
            if dmu_p is not None:
                block.mlp.dmu_p = dmu_p
            if dtu_r is not None:
                block.attn.dtu_r = dtu_r

    def hidden(self, idx, caches=None):
        """Tokens (B, T) -> final hidden states (B, T, C); with caches (one KVCache per layer)."""
        T = idx.size(1)
        start = caches[0].pos if caches else 0  # positions continue after the cached ones
        assert start + T <= self.config.block_size, (
            f"sequence of {start + T} > block_size {self.config.block_size}")
        pos = torch.arange(start, start + T, dtype=torch.long, device=idx.device)  # (T,)
        # token embeddings (B, T, C) plus position embeddings (T, C), broadcast over the batch
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for i, block in enumerate(self.transformer.h):  # each with its own layer's cache
            x = block(x, caches[i] if caches else None)
        return self.transformer.ln_f(x)  # pre-LN blocks leave the residual stream unnormalised

    def forward(self, idx, targets=None):
        """Tokens (B, T) -> logits (B, T, V) and, with targets, the loss (else None)."""
        logits = self.lm_head(self.hidden(idx))  # (B, T, V), via the LM head tied to wte
        if targets is None:
            return logits, None
        # mean cross-entropy in float32 over positions whose target is not -1 (BERT's unmasked)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1),
                               ignore_index=-1)
        return logits, loss

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        """AdamW; 2-D weights (matmuls, embeddings) decay, biases and LayerNorm gains do not."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [{'params': [p for p in params if p.dim() >= 2], 'weight_decay': weight_decay},
                  {'params': [p for p in params if p.dim() < 2], 'weight_decay': 0.0}]
        fused = device_type in ('cpu', 'cuda')  # one kernel: a third of the default's CPU time
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=fused)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, stop_token=None,
                 top_p=1.0, use_cache=True):
        """GPT: append max_new_tokens sampled tokens to idx (B, t), the same cached or not."""
        block_size = self.config.block_size
        # a KVCache per layer in eval mode only: training redraws DTU, DMU and dropout every forward
        use_cache = use_cache and not self.training
        caches = [KVCache(block_size) for _ in self.transformer.h] if use_cache else None
        done = torch.zeros(idx.size(0), 1, dtype=torch.bool, device=idx.device)  # (B, 1)
        for _ in range(max_new_tokens):
            # cached: only new tokens (prompt, then one); past block_size: crop and recompute all
            if caches and idx.size(1) <= block_size:
                h = self.hidden(idx[:, caches[0].pos:], caches)  # (B, T, C)
            else:
                h = self.hidden(idx[:, -block_size:])  # (B, min(t, block_size), C)
            logits = self.lm_head(h[:, -1, :])  # (B, V): the last position alone predicts the next
            idx_next = sample_next(logits, temperature, top_k, top_p)  # (B, 1)
            if stop_token is not None:  # rows that emitted stop_token keep emitting it
                idx_next = idx_next.masked_fill(done, stop_token)
                done |= idx_next == stop_token
            idx = torch.cat((idx, idx_next), dim=1)  # (B, t + 1)
        return idx

    @torch.no_grad()
    def generate_masked(self, idx, mask_id, steps=10, temperature=1.0, top_k=None, top_p=1.0):
        """BERT: iterative mask-predict (Ghazvininejad et al. 2019) of idx's mask_id positions."""
        idx = idx.clone()
        masked = idx == mask_id
        total = masked.sum(dim=1, keepdim=True)  # (B, 1)
        for step in range(steps):
            # predict every position of the partly masked sequence, sample each with the decoder
            logits, _ = self(idx)  # (B, T, V)
            logits[..., mask_id] = -float('inf')  # [MASK] is never a prediction
            decoded = F.softmax(decoder_logits(logits, temperature, top_k, top_p), dim=-1)
            sample = torch.multinomial(decoded.view(-1, decoded.size(-1)), 1).view(idx.shape)
            # confidence: the model's own probability (a one-token decoder's would tie at 1)
            probs = F.softmax(logits.float(), dim=-1)
            conf = probs.gather(-1, sample.unsqueeze(-1)).squeeze(-1).masked_fill(~masked, -1.0)
            # fill the most confident masked positions: the number still masked falls linearly to 0
            n_fill = masked.sum(dim=1, keepdim=True) - (total * (steps - 1 - step)) // steps
            rank = conf.argsort(dim=1, descending=True).argsort(dim=1)  # 0 = most confident
            fill = masked & (rank < n_fill)
            idx[fill] = sample[fill]
            masked &= ~fill
        return idx


def sample_next(logits, temperature=1.0, top_k=None, top_p=1.0):
    """Logits (B, V) -> next tokens (B, 1) from decoder_logits' distribution, without host sync."""
    if temperature == 0:
        return logits.float().argmax(dim=-1, keepdim=True)
    probs = F.softmax(decoder_logits(logits, temperature, top_k, top_p), dim=-1)
    return torch.multinomial(probs, num_samples=1)


def decoder_logits(logits, temperature=1.0, top_k=None, top_p=1.0):
    """Logits (..., V) -> float logits whose softmax is the decoder's; cut tokens get -inf."""
    logits = logits.float()
    if temperature == 0:  # greedy: the argmax alone
        return logits.masked_fill(logits < logits.amax(dim=-1, keepdim=True), -float('inf'))
    logits = logits / temperature
    if top_k is not None:  # top-k: cut every token below the k-th largest logit
        v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
        logits = logits.masked_fill(logits < v[..., [-1]], -float('inf'))
    if top_p < 1:  # nucleus (Holtzman et al. 2019): the most probable tokens up to mass top_p
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # (..., V) each
        probs = F.softmax(sorted_logits, dim=-1)
        outside = probs.cumsum(dim=-1) - probs >= top_p  # the mass before it already reaches top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(outside, -float('inf')))
    return logits


def mask_id(vocab_size):
    """BERT's [MASK] token in a model of vocab_size ids: the last one. train.py gives BERT one id
    more than its tokenizer has, so the ids below [MASK] are the tokenizer's real tokens."""
    return vocab_size - 1


def mask_tokens(idx, mask_id, vocab_size, generator=None):
    """BERT masked-LM corruption of idx (B, T) -> (inputs, targets); vocab_size: the tokenizer's."""
    # choose 15% of positions to predict; of those 80% become [MASK], 10% a random token, 10% stay
    chosen = torch.rand(idx.shape, generator=generator, device=idx.device) < 0.15
    action = torch.rand(idx.shape, generator=generator, device=idx.device)
    inputs = idx.masked_fill(chosen & (action < 0.8), mask_id)
    rand_pos = chosen & (action >= 0.8) & (action < 0.9)
    random_tokens = torch.randint(vocab_size, idx.shape, generator=generator, device=idx.device)
    inputs = torch.where(rand_pos, random_tokens, inputs)  # not inputs[rand_pos] = ...: no GPU sync
    targets = torch.where(chosen, idx, torch.full_like(idx, -1))  # -1: not a target
    return inputs, targets

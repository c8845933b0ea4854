"""
Hand-written GPT-2 and BERT in one file, with the paper's two stochastic units.

- GPT-2: pre-LayerNorm, learned positions, tied embeddings, tanh-GELU MLP, causal attention.
- BERT: the same Block without the causal mask, trained as a masked LM (see `mask_tokens`).
- DMU, Dynamic MLP Unit (App. B.3): the MLP keeps each hidden unit with retention p.
- DTU, Dynamic Transformer Unit (App. B.4, eq. 142): attention logits from a score-weighted
  random subset of each head's dimensions.
With dropout=0, dmu_p=1 and dtu_r=1 the network is exactly GPT-2 (nanoGPT's names and keys).
"""
import math
import os
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
    dmu_mode: str = 'fix'    # 'prob' (Bernoulli per unit), 'fix' (exactly floor(p*n)), 'edge' (per weight)
    dtu_r: float = 1.0       # DTU keep ratio of each head's dimensions (1 = off)


class CausalSelfAttention(nn.Module):

    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head, self.n_embd, self.dropout = config.n_head, config.n_embd, config.dropout
        self.causal = config.causal
        self.dtu_r = config.dtu_r

    def forward(self, x, cache=None):
        """x (B, T, C). With a KVCache (sampling, eval mode) x holds the next T positions only and
        attends to the cached ones too."""
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        if cache is not None:
            k, v = cache.append(k, v)  # (B, nh, pos + T, hs)
        scale = None  # SDPA's default 1/sqrt(head dim)
        if self.training and self.dtu_r < 1:
            q, k = dtu_select(q, k, self.dtu_r)
            scale = 1.0 / math.sqrt(q.size(-1))
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0,
                                           is_causal=self.causal and T > 1, scale=scale)  # one query: sees every key
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


def dtu_select(q, k, r):
    """DTU (App. B.4, eq. 142): keep round(r*hs) of each head's hs dimensions for the logits.

    Compatibility score of dimension i: ||Q[:, i]|| * ||K[:, i]|| over the sequence (detached).
    The kept set is drawn without replacement with probability proportional to the score, by
    Gumbel-top-k (Plackett-Luce sampling: no host sync, fixed shapes). Values are not touched.
    """
    hs = q.size(-1)
    kept = max(1, round(r * hs))
    with torch.no_grad():
        score = q.norm(dim=2) * k.norm(dim=2)  # (B, nh, hs)
        gumbel = -torch.log(-torch.log(torch.rand_like(score).clamp_(1e-20, 1.0)))
        idx = (score.clamp_min(1e-20).log() + gumbel).topk(kept, dim=-1).indices
    idx = idx.unsqueeze(2).expand(-1, -1, q.size(2), -1)
    return q.gather(-1, idx), k.gather(-1, idx)


class KVCache:
    """One layer's keys and values for sampling: (B, nh, block_size, hs) buffers, allocated at the
    first write in the dtype of the computed keys (bf16 under autocast), filled left to right.
    The fill level `pos` is a Python int, so a sampling step never waits on the device. A prompt
    fills an empty cache; after it, one token at a time (the causal mask is then not needed)."""

    def __init__(self, block_size):
        self.block_size, self.pos = block_size, 0
        self.k = self.v = None

    def append(self, k, v):
        """k, v (B, nh, T, hs) of the next T positions -> those of every position so far (B, nh, pos + T, hs)."""
        T = k.size(2)
        assert self.pos == 0 or T == 1, "a KVCache takes a prompt, then one token at a time"
        assert self.pos + T <= self.block_size, f"KVCache full: {self.pos} + {T} > block_size {self.block_size}"
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
        if not self.training or p >= 1:
            return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))
        if self.dmu_mode == 'edge':
            return self.dropout(self.edge_forward(x, p))
        return self.dropout(self.node_forward(x, p))

    def node_forward(self, x, p):
        """DMU node-level (Def. A.4; DProb/DFix of eqs. 111-118): slice the kept hidden units
        out of both weight matrices, so a step at p=0.5 multiplies matrices half as wide. 'prob'
        keeps each unit with probability p: a uniform subset of size k ~ Binomial(n, p) is the
        same distribution (drawn on the CPU, so no device sync). 'fix' keeps exactly
        k = floor(p*n) (eq. 116). The kept activations are rescaled by 1/p for 'prob' and n/k for
        'fix' (equal to 1/p when p*n is whole), so the output is unbiased in expectation
        (eqs. 117-118; Lemma B.4)."""
        n = self.c_fc.out_features
        if self.dmu_mode == 'prob':
            k, scale = int(torch.binomial(torch.tensor(float(n)), torch.tensor(p))), 1.0 / p
        else:
            k = max(1, math.floor(p * n))
            scale = n / k
        idx = torch.randperm(n, device=x.device)[:k]
        b_fc = self.c_fc.bias[idx] if self.c_fc.bias is not None else None
        h = self.gelu(F.linear(x, self.c_fc.weight[idx], b_fc))
        return F.linear(h * scale, self.c_proj.weight[:, idx], self.c_proj.bias)

    def edge_forward(self, x, p):
        """DMU edge-level (Def. A.3, 'DMU2'): an independent Bernoulli(p) mask on every weight of
        both matrices, rescaled by 1/p (eq. 79). Slow (two full-size masks); here to teach
        Thm B.5."""
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
        """GPT-2's init. Also re-run by distributed.build_fsdp on FSDP's local shards (DTensors) after a
        meta-device build, so that no rank ever holds the whole model."""
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
            module.reset_parameters()  # ones and zeros: a no-op at construction, needed after to_empty

    def get_num_params(self):
        return sum(p.numel() for p in self.parameters())  # tied weights are counted once

    def estimate_mfu(self, tokens_per_s, peak_flops):
        """Model FLOPs utilisation, as nanoGPT (PaLM, App. B): 6N + 12*L*H*Q*T FLOPs per token for
        forward and backward, N the parameters less the position table, Q the head size, T the
        context. Counted for the full model: DMU/DTU skip work, so their MFU understates the load."""
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
        """Final hidden states (after ln_f), shape (B, T, n_embd). With caches (one KVCache per
        layer), idx holds the tokens after the cached ones."""
        T = idx.size(1)
        start = caches[0].pos if caches else 0
        assert start + T <= self.config.block_size, f"sequence of {start + T} > block_size {self.config.block_size}"
        pos = torch.arange(start, start + T, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for i, block in enumerate(self.transformer.h):
            x = block(x, caches[i] if caches else None)
        return self.transformer.ln_f(x)

    def forward(self, idx, targets=None):
        """Logits (B, T, V) and, with targets, the mean cross-entropy over positions whose
        target is not -1 (BERT marks unmasked positions -1)."""
        logits = self.lm_head(self.hidden(idx))
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        """AdamW; 2-D weights (matmuls, embeddings) decay, biases and LayerNorm gains do not."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [{'params': [p for p in params if p.dim() >= 2], 'weight_decay': weight_decay},
                  {'params': [p for p in params if p.dim() < 2], 'weight_decay': 0.0}]
        fused = device_type in ('cpu', 'cuda')  # one kernel for every tensor: a third of the default's time on a CPU
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=fused)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, stop_token=None, top_p=1.0,
                 use_cache=True):
        """GPT: sample autoregressively (see sample_next for the decoders). Rows that emit
        stop_token keep emitting it. In eval mode a KVCache per layer makes each step run the new
        token alone, while the sequence fits in block_size; past it, the window is cropped to the
        last block_size tokens and recomputed, as without the cache, so the tokens are the same.
        In training mode DTU, DMU and dropout draw per forward over the whole window, which
        a cache cannot replay: every step recomputes."""
        block_size = self.config.block_size
        caches = [KVCache(block_size) for _ in self.transformer.h] if use_cache and not self.training else None
        done = torch.zeros(idx.size(0), 1, dtype=torch.bool, device=idx.device)
        for _ in range(max_new_tokens):
            if caches and idx.size(1) <= block_size:
                h = self.hidden(idx[:, caches[0].pos:], caches)  # the prompt, then one token: (B, T, C)
            else:
                h = self.hidden(idx[:, -block_size:])  # (B, min(t, block_size), C)
            logits = self.lm_head(h[:, -1, :])  # the last position alone: (B, V)
            idx_next = sample_next(logits, temperature, top_k, top_p)  # (B, 1)
            if stop_token is not None:
                idx_next = idx_next.masked_fill(done, stop_token)
                done |= idx_next == stop_token
            idx = torch.cat((idx, idx_next), dim=1)
        return idx

    @torch.no_grad()
    def generate_masked(self, idx, mask_id, steps=10, temperature=1.0, top_k=None, top_p=1.0):
        """BERT: iterative mask-predict (Ghazvininejad et al. 2019). Positions equal to mask_id
        are filled over `steps` rounds; each round samples every masked position from
        decoder_logits' distribution and keeps the most confident ones, so the number still masked
        falls linearly to zero."""
        idx = idx.clone()
        masked = idx == mask_id
        total = masked.sum(dim=1, keepdim=True)
        for step in range(steps):
            logits, _ = self(idx)  # (B, T, V)
            logits[..., mask_id] = -float('inf')  # [MASK] is never a prediction
            decoded = F.softmax(decoder_logits(logits, temperature, top_k, top_p), dim=-1)
            sample = torch.multinomial(decoded.view(-1, decoded.size(-1)), 1).view(idx.shape)
            probs = F.softmax(logits.float(), dim=-1)  # confidence: the model's own (a one-token decoder's ties at 1)
            conf = probs.gather(-1, sample.unsqueeze(-1)).squeeze(-1).masked_fill(~masked, -1.0)
            n_fill = masked.sum(dim=1, keepdim=True) - (total * (steps - 1 - step)) // steps
            rank = conf.argsort(dim=1, descending=True).argsort(dim=1)
            fill = masked & (rank < n_fill)
            idx[fill] = sample[fill]
            masked &= ~fill
        return idx


def sample_next(logits, temperature=1.0, top_k=None, top_p=1.0):
    """Logits (B, V) of the next token -> tokens (B, 1), drawn from decoder_logits' distribution;
    temperature 0 is greedy (argmax). No host sync."""
    if temperature == 0:
        return logits.float().argmax(dim=-1, keepdim=True)
    return torch.multinomial(F.softmax(decoder_logits(logits, temperature, top_k, top_p), dim=-1), num_samples=1)


def decoder_logits(logits, temperature=1.0, top_k=None, top_p=1.0):
    """Logits (..., V) -> float logits (..., V) whose softmax is the decoder's distribution of the next
    token: temperature 0 keeps the argmax alone (greedy); else softmax(logits / temperature), cut to
    the top_k tokens and then to the nucleus: the most probable tokens whose mass reaches top_p
    (Holtzman et al. 2019; top_p=1 is off). Cut tokens get -inf."""
    logits = logits.float()
    if temperature == 0:
        return logits.masked_fill(logits < logits.amax(dim=-1, keepdim=True), -float('inf'))
    logits = logits / temperature
    if top_k is not None:
        v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
        logits = logits.masked_fill(logits < v[..., [-1]], -float('inf'))
    if top_p < 1:
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
    """BERT masked-LM corruption: choose 15% of positions; of those 80% become [MASK] (mask_id),
    10% a random token of range(vocab_size) (pass the tokenizer's vocabulary: real tokens only),
    10% stay. Returns (inputs, targets) with targets -1 at unchosen positions."""
    u = torch.rand(idx.shape, generator=generator, device=idx.device)
    chosen = u < 0.15
    action = torch.rand(idx.shape, generator=generator, device=idx.device)
    inputs = idx.masked_fill(chosen & (action < 0.8), mask_id)
    rand_pos = chosen & (action >= 0.8) & (action < 0.9)
    random_tokens = torch.randint(vocab_size, idx.shape, generator=generator, device=idx.device)
    inputs = torch.where(rand_pos, random_tokens, inputs)  # not inputs[rand_pos] = ...: no GPU sync
    targets = torch.where(chosen, idx, torch.full_like(idx, -1))
    return inputs, targets


PEAK_FLOPS = {'H100 PCIe': 756e12, 'H100 NVL': 835e12, 'H100': 989e12, 'H200': 989e12,  # dense bf16 FLOP/s,
              'A100': 312e12}  # by GPU name; the first name found in torch.cuda.get_device_name() wins


def peak_flops(device_name):
    """Dense bf16 peak of a GPU from torch.cuda.get_device_name(); None where unknown."""
    return next((v for k, v in PEAK_FLOPS.items() if k in device_name), None)


def count_params(config):
    """Parameter count without allocating: the model is built on the meta device."""
    with torch.device('meta'):
        return GPT(config).get_num_params()


CONV1D = ('attn.c_attn.weight', 'attn.c_proj.weight', 'mlp.c_fc.weight', 'mlp.c_proj.weight')


def load_gpt2_state_dict(sd):
    """GPT-2 weights in nanoGPT or Hugging Face layout -> (GPTConfig, nanoGPT state dict).

    Hugging Face stores the four matmuls as Conv1D (in, out): they are transposed, as nanoGPT's
    from_pretrained does. Keys may lack the 'transformer.' prefix (GPT2Model). n_head is not in
    the weights; it is n_embd // 64, as in every released GPT-2. A nanoGPT checkpoint (a dict
    with a 'model' entry) works too."""
    if isinstance(sd, dict) and isinstance(sd.get('model'), dict):
        sd = sd['model']
    if not isinstance(sd, dict) or not any(k.endswith('wte.weight') for k in sd):
        raise SystemExit("error: init_from file holds no GPT-2 weights (no wte.weight)")
    sd = {k.removeprefix('_orig_mod.').removeprefix('module.'): v for k, v in sd.items()}
    sd = {(k if k.startswith(('transformer.', 'lm_head.')) else 'transformer.' + k): v for k, v in sd.items()
          if not k.endswith(('.attn.bias', '.attn.masked_bias'))}
    wte, wpe = sd.get('transformer.wte.weight'), sd.get('transformer.wpe.weight')
    if (not all(isinstance(v, torch.Tensor) for v in sd.values()) or wte is None or wpe is None or wte.dim() != 2
            or wpe.dim() != 2 or not wte.size(1) or wte.size(1) % 64 or 'transformer.h.0.attn.c_attn.weight' not in sd):
        raise SystemExit("error: init_from file is not GPT-2 weights: it needs tensors wte (vocabulary x n_embd, n_embd a "
                         "multiple of 64: n_head = n_embd // 64), wpe (positions x n_embd) and h.0.attn.c_attn at least")
    n_embd = wte.size(1)
    hf_layout = sd['transformer.h.0.attn.c_attn.weight'].shape == (n_embd, 3 * n_embd)
    if hf_layout:
        sd = {k: (v.t().contiguous() if k.endswith(CONV1D) else v) for k, v in sd.items()}
    sd.setdefault('lm_head.weight', wte)
    n_layer = 1 + max(int(k.split('.')[2]) for k in sd if k.startswith('transformer.h.') and k.split('.')[2].isdigit())
    config = GPTConfig(n_layer=n_layer, n_head=n_embd // 64, n_embd=n_embd, vocab_size=wte.size(0),
                       block_size=wpe.size(0), bias='transformer.ln_f.bias' in sd)
    return config, sd


def load_checkpoint(path):
    """torch.load, or for a .safetensors file (Hugging Face's weights) its dict of tensors, with one-line
    errors for a missing or unreadable file. safetensors is imported only for such a file."""
    if not os.path.isfile(path):
        raise SystemExit(f"error: checkpoint {path!r} {'is not a regular file' if os.path.exists(path) else 'does not exist'}")
    if path.endswith('.safetensors'):
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise SystemExit(f"error: {path!r} is a safetensors file: pip install safetensors")
        try:
            return load_file(path, device='cpu')
        except Exception as e:
            raise SystemExit(f"error: checkpoint {path!r} is corrupt or not a safetensors file ({type(e).__name__})")
    try:  # mmap: pages are read on use and shared by the ranks that all load the same file
        return torch.load(path, map_location='cpu', weights_only=False, mmap=True)
    except Exception:
        pass  # a legacy (non-zip) file cannot be mapped
    try:
        return torch.load(path, map_location='cpu', weights_only=False)
    except Exception as e:
        raise SystemExit(f"error: checkpoint {path!r} is corrupt or not a checkpoint ({type(e).__name__})")


def load_model_state(model, state, path):
    try:
        model.load_state_dict({k.removeprefix('_orig_mod.'): v for k, v in state.items()})
    except RuntimeError as e:
        detail = ' '.join(str(e).split())[:300]
        raise SystemExit(f"error: checkpoint {path!r} does not match the model: {detail}")

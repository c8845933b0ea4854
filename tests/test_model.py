"""model.py: masking, the DMU and DTU units, BERT corruption, named sizes, GPT-2 weight loading,
and the two samplers. Every model here is tiny; every random test is seeded."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import model as M
from checkpoint import load_gpt2_state_dict, load_model_state
from conftest import count_params
from distributed import peak_flops
from model import GPT, GPTConfig, MLP, CausalSelfAttention


def tiny(**kw):
    args = dict(block_size=16, vocab_size=50, n_layer=2, n_head=2, n_embd=32)
    args.update(kw)
    return GPTConfig(**args)


# ---------------------------------------------------------------- causal masking

@pytest.mark.parametrize('causal', [True, False])
def test_masking_gpt_causal_bert_bidirectional(causal):
    """GPT: changing token 5 leaves the logits at positions 0..4 unchanged (bit for bit) and moves
    the ones from 5 on. BERT (causal=False): the same change moves the logits at position 0."""
    torch.manual_seed(0)
    m = GPT(tiny(causal=causal)).eval()
    idx = torch.randint(50, (1, 10))
    idx2 = idx.clone()
    idx2[0, 5] = (idx[0, 5] + 1) % 50
    with torch.no_grad():
        a, _ = m(idx)
        b, _ = m(idx2)
    later = (a[:, 5:] - b[:, 5:]).abs().max().item()
    earlier = (a[:, :5] - b[:, :5]).abs().max().item()
    assert later > 1e-4  # the change moves logits by ~0.5 (BERT's position 0: 8e-3); float32 rounding is ~1e-7
    if causal:
        assert earlier == 0  # the changed key and value enter rows 0..4 only as p = 0 weights (0 * v = 0): exact
    else:
        assert earlier > 1e-4


# ---------------------------------------------------------------- DMU

def plain_mlp(mlp, x):
    return mlp.c_proj(mlp.gelu(mlp.c_fc(x)))


@pytest.mark.parametrize('mode', ['prob', 'fix', 'edge'])
def test_dmu_p1_is_bit_identical_to_plain_mlp(mode):
    torch.manual_seed(0)
    mlp = MLP(tiny(dmu_p=1.0, dmu_mode=mode)).train()
    x = torch.randn(3, 7, 32)
    assert torch.equal(mlp(x), plain_mlp(mlp, x))
    m = GPT(tiny(dmu_p=1.0, dmu_mode=mode)).train()  # and the whole model, train vs eval
    idx = torch.randint(50, (2, 9))
    assert torch.equal(m(idx)[0], m.eval()(idx)[0])


def mc_mean(f, n):
    outs = torch.stack([f() for _ in range(n)])
    return outs.mean(0), outs.std(0) / math.sqrt(n)


def assert_unbiased(mean, se, ref):
    """Each coordinate's Monte-Carlo mean lies within 5 standard errors of the reference: for
    the ~100 coordinates here a false alarm has probability ~1e-4 (and the seed is fixed);
    a biased estimator (e.g. a missing or wrong 1/p rescale, ~2x or ~0.5x) is off by far more."""
    z = ((mean - ref).abs() / (se + 1e-12)).max().item()
    assert z < 5, f"max z-score {z:.2f}"
    rel = ((mean - ref).norm() / ref.norm()).item()
    assert rel < 5 * (se.norm() / ref.norm()).item() + 1e-6  # + 1e-6, + 1e-12: guards for se = 0, nil beside 5 se (~0.09)


@pytest.mark.parametrize('mode', ['prob', 'fix'])
def test_dmu_node_level_is_unbiased(mode):
    """Eqs. 117-118 / Lemma B.4: node-level DProb and DFix leave the MLP output unchanged in
    expectation (GELU comes before the mask, so this holds exactly, not only as n -> inf)."""
    torch.manual_seed(1)
    mlp = MLP(tiny(n_embd=16, dmu_p=0.5, dmu_mode=mode)).train()
    with torch.no_grad():
        x = torch.randn(6, 16)
        ref = plain_mlp(mlp, x)
        mean, se = mc_mean(lambda: mlp(x), 3000)
    assert_unbiased(mean, se, ref)
    # the mask is really random: two draws differ
    with torch.no_grad():
        assert not torch.equal(mlp(x), mlp(x))


def test_dmu_prob_fix_edge_same_expectation_linear():
    """Thm B.5 / Lemma B.4 is stated for linear MLPs: with the activation made the identity,
    node-level Prob, node-level Fix and edge-level masks all have the unmasked output as their
    expectation (edge-level: E[mask/p] = 1 per weight, and the two masks are independent).
    With GELU the edge-level mask sits inside the nonlinearity and is only asymptotically
    unbiased, which this small width cannot show; the node-level test above covers GELU."""
    torch.manual_seed(2)
    x = torch.randn(6, 16)
    means = {}
    for mode in ('prob', 'fix', 'edge'):
        mlp = MLP(tiny(n_embd=16, dmu_p=0.5, dmu_mode=mode)).train()
        if mode == 'prob':
            state = mlp.state_dict()
        mlp.load_state_dict(state)
        mlp.gelu = torch.nn.Identity()
        with torch.no_grad():
            ref = plain_mlp(mlp, x)
            mean, se = mc_mean(lambda: mlp(x), 3000)
        assert_unbiased(mean, se, ref)
        means[mode] = mean
    # and so the three agree with each other (difference of two MC means: sqrt(2) x the error)
    scale = ref.norm()
    for a, b in (('prob', 'fix'), ('prob', 'edge'), ('fix', 'edge')):
        # |se| is 0.018 (prob, fix) and 0.033 (edge) of |ref|: a difference's norm ~0.037 of it, over 96 coordinates
        # (the norm varies by ~7%): 0.1 is 2.7x that, a false alarm needs chi^2_96 > 700
        assert (means[a] - means[b]).norm() / scale < 0.1


@pytest.mark.parametrize('mode', ['prob', 'fix'])
def test_dmu_half_retention_halves_mlp_flops(mode):
    """Node-level DMU slices the kept units out of both matrices: at p=0.5, forward+backward
    matmul flops are exactly half for 'fix' (floor(0.5*256)=128 units) and k/256 with
    k ~ Binomial(256, 0.5) for 'prob' (within 5 sigma = +-0.16 of 0.5)."""
    torch.manual_seed(3)
    x = torch.randn(2, 8, 64)

    def flops(p):
        mlp = MLP(tiny(n_embd=64, dmu_p=p, dmu_mode=mode)).train()
        with FlopCounterMode(display=False) as fc:
            mlp(x).sum().backward()
        return fc.get_total_flops()

    full, half = flops(1.0), flops(0.5)
    assert full > 0
    if mode == 'fix':
        assert half / full == 0.5  # integer FLOP counts, exactly half
    else:
        assert 0.34 < half / full < 0.66


# ---------------------------------------------------------------- DTU

def reference_attention(attn, x, q_k_override=None):
    """Plain softmax attention written out, with c_attn / c_proj from the module."""
    B, T, C = x.shape
    nh = attn.n_head
    q, k, v = attn.c_attn(x).split(C, dim=2)
    q, k, v = (t.view(B, T, nh, C // nh).transpose(1, 2) for t in (q, k, v))
    if q_k_override is not None:
        q, k = q_k_override
    att = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))
    if attn.causal:
        att = att.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float('-inf'))
    y = F.softmax(att, dim=-1) @ v
    return attn.c_proj(y.transpose(1, 2).reshape(B, T, C))


@pytest.mark.parametrize('causal', [True, False])
def test_dtu_r1_equals_plain_attention(causal):
    """r=1 in train mode is bit-identical to the eval path (which never uses DTU) and equals
    the written-out softmax attention to float32 rounding (1e-5: sums of <= 32 terms, |y| < 1)."""
    torch.manual_seed(4)
    attn = CausalSelfAttention(tiny(dtu_r=1.0, causal=causal)).train()
    x = torch.randn(2, 10, 32)
    with torch.no_grad():
        y_train = attn(x)
        y_eval = attn.eval()(x)
        ref = reference_attention(attn, x)
    assert torch.equal(y_train, y_eval)
    # float32 sums of <= 32 terms (q.k 16, softmax and att @ v 10, c_proj 32) of |y| < 1: ~sqrt(32) eps32 = 3e-7 each
    # (measured <= 1.2e-7 at any SIMD width, 1-2 threads); 1e-5 is 30x that, and a wrong scale or dim moves y by > 1e-2
    assert torch.allclose(y_train, ref, atol=1e-5, rtol=0)


def test_dtu_keeps_round_r_hs_dims_and_uses_them(monkeypatch):
    """r<1: q and k keep round(r*hs) of each head's dims (the same dims for q and k, distinct
    original columns), and attention is computed from exactly those with scale 1/sqrt(kept)."""
    torch.manual_seed(5)
    B, nh, T, hs = 3, 2, 5, 8
    q = torch.arange(1, hs + 1, dtype=torch.float32).expand(B, nh, T, hs).clone()
    k = 10 * q
    for r, kept in ((0.5, 4), (0.3, 2), (0.9, 7), (0.01, 1)):
        qs, ks = M.dtu_select(q, k, r)
        assert qs.shape == (B, nh, T, kept) and ks.shape == (B, nh, T, kept)
        assert torch.equal(ks, 10 * qs)  # the same dims for q and k
        cols = qs[:, :, 0, :]  # column j of q holds the constant j+1: recover the indices
        assert torch.equal(qs, cols.unsqueeze(2).expand_as(qs))
        for row in cols.reshape(-1, kept).tolist():
            assert len(set(row)) == kept  # without replacement

    # the attention output is built from the selected dims, scaled by 1/sqrt(kept)
    attn = CausalSelfAttention(tiny(dtu_r=0.5)).train()
    seen = {}
    real = M.dtu_select

    def spy(q, k, r):
        seen['qk'] = real(q, k, r)
        return seen['qk']

    monkeypatch.setattr(M, 'dtu_select', spy)
    x = torch.randn(2, 6, 32)
    with torch.no_grad():
        y = attn(x)
        ref = reference_attention(attn, x, q_k_override=seen['qk'])
    assert seen['qk'][0].size(-1) == 8  # hs = 16, r = 0.5
    assert torch.allclose(y, ref, atol=1e-5, rtol=0)  # float32 rounding, as for r = 1 above


def test_dtu_samples_proportional_to_score():
    """Scores of dims 0..3 are made proportional to (0, 1, 2, 3): with kept=1 (r=0.25, hs=4)
    dim 0 is never drawn and dims 1..3 are drawn with frequency 1/6, 2/6, 3/6, each within
    5 binomial standard deviations over 6000 independent draws (sd <= 0.0065)."""
    torch.manual_seed(6)
    n, T = 6000, 2
    col = torch.tensor([0.0, 1.0, 2.0, 3.0]).sqrt()
    q = col.expand(n, 1, T, 4).clone()  # ||Q[:, i]|| * ||K[:, i]|| = T * col_i^2
    qs, _ = M.dtu_select(q, q.clone(), 0.25)
    picked = qs[:, 0, 0, 0]
    freq = torch.stack([(picked == c).float().mean() for c in col])
    assert freq[0].item() == 0.0
    expected = torch.tensor([0, 1, 2, 3]) / 6
    sd = (expected * (1 - expected) / n).sqrt()
    assert ((freq - expected).abs() <= 5 * sd + 1e-9).all(), freq  # 5 sd: false alarm 2e-6; 1e-9: dim 0's sd is 0
    # a zero-score dim is never picked even when most dims are kept (3 of 4)
    qs, _ = M.dtu_select(q[:500], q[:500].clone(), 0.75)
    assert not (qs == 0).any()


# ---------------------------------------------------------------- BERT corruption

def test_bert_mask_proportions():
    """15% of positions chosen; of those 80% -> [MASK], 10% -> random, 10% unchanged (a random
    token equals the original with probability 1/V, V=1000). Each proportion within 5 binomial
    standard deviations. Unchosen positions keep their token and have target -1."""
    g = torch.Generator().manual_seed(7)
    V = 1000  # the tokenizer's ids; BERT's model has V + 1, [MASK] the last
    mask_id = M.mask_id(V + 1)
    assert mask_id == V
    idx = torch.randint(V, (200, 1000), generator=g)
    inputs, targets = M.mask_tokens(idx, mask_id, V, generator=g)
    n = idx.numel()
    chosen = targets != -1
    nc = chosen.sum().item()

    def close(count, total, p):  # 5 binomial sd: a false alarm has probability 6e-7 (each of the 4)
        assert abs(count / total - p) <= 5 * math.sqrt(p * (1 - p) / total), (count / total, p)

    close(nc, n, 0.15)
    assert torch.equal(targets[chosen], idx[chosen])
    assert torch.equal(inputs[~chosen], idx[~chosen])
    masked = (inputs == mask_id) & chosen
    same = (inputs == idx) & chosen
    other = chosen & ~masked & ~same
    close(masked.sum().item(), nc, 0.8)
    close(same.sum().item(), nc, 0.1 + 0.1 / V)
    close(other.sum().item(), nc, 0.1 * (1 - 1 / V))
    assert (inputs[other] < V).all()  # random tokens are real tokens, never [MASK]
    assert not (inputs[~chosen] == mask_id).any()


# ---------------------------------------------------------------- named sizes

def config_for(size, vocab_size, block_size):
    """The GPTConfig of a named size (train.SIZES, beside the keys it sets); bert-* sizes are bidirectional."""
    from train import SIZES  # here: test files that never train do not import train
    n_layer, n_head, n_embd = SIZES[size]
    return GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, vocab_size=vocab_size, block_size=block_size,
                     causal=not size.startswith('bert'))


@pytest.mark.parametrize('size,target', [('gpt2', 124e6), ('gpt2-1b', 1e9), ('gpt2-2b', 2e9),
                                         ('gpt2-3b', 3e9), ('bert-1b', 1e9)])
def test_named_size_parameter_counts(size, target):
    """Within 10% of the name, counted on the meta device (GPT-2 vocabulary and context)."""
    vocab = 50257 + size.startswith('bert')
    n = count_params(config_for(size, vocab, 1024))
    assert abs(n - target) / target < 0.10, f"{size}: {n / 1e6:.1f}M"  # counts are exact; 10%: how close a name is


def test_count_params_never_allocates_a_weight(monkeypatch):
    """count_params counts gpt2-3b (12 GB of float32 weights) without creating one real
    parameter: every Parameter made while it runs must be on the meta device. The check fails at
    the first real one, before any weight is initialised, so a broken count_params fails fast."""
    new = torch.nn.Parameter.__new__

    def meta_only(cls, data=None, requires_grad=True):
        assert data is None or data.is_meta, f"count_params allocated a {tuple(data.shape)} weight"
        return new(cls, data, requires_grad)

    monkeypatch.setattr(torch.nn.Parameter, '__new__', meta_only)
    L, d, V, T = 36, 2560, 50257, 1024  # gpt2-3b: per block 12 d^2 + 13 d, plus embeddings, ln_f
    assert count_params(config_for('gpt2-3b', V, T)) == L * (12 * d * d + 13 * d) + (V + T + 2) * d
    monkeypatch.undo()
    assert count_params(config_for('tiny', 50, 16)) == GPT(config_for('tiny', 50, 16)).get_num_params()


def test_mfu_counts_palm_flops_per_token_against_the_gpu_peak():
    """GPT-2 124M at context 1024: 6N + 12*L*H*Q*T = 6 * 123,653,376 (the parameters less the
    position table) + 12*12*12*64*1024 = 855,166,464 FLOPs a token (PaLM, App. B)."""
    with torch.device('meta'):
        m = GPT(config_for('gpt2', 50257, 1024))
    assert m.get_num_params() == 124_439_808
    assert m.estimate_mfu(1e5, 989e12) == pytest.approx(855_166_464 * 1e5 / 989e12, rel=1e-12)  # fp64, a few roundings
    names = ('NVIDIA H100 80GB HBM3', 'NVIDIA H100 PCIe', 'NVIDIA H100 NVL', 'NVIDIA H200', 'NVIDIA A100-SXM4-80GB')
    assert [peak_flops(n) for n in names] == [989e12, 756e12, 835e12, 989e12, 312e12]
    assert peak_flops('NVIDIA GeForce RTX 4090') is None  # no MFU rather than a wrong one


# ---------------------------------------------------------------- GPT-2 weights

CONV1D = ('attn.c_attn.weight', 'attn.c_proj.weight', 'mlp.c_fc.weight', 'mlp.c_proj.weight')


def hf_state_dict(src, lm_head):
    """A nanoGPT model's weights in Hugging Face layout: Conv1D (in, out) matrices, attn.bias
    and attn.masked_bias buffers; GPT2Model keys (no 'transformer.') or GPT2LMHeadModel keys."""
    T = src.config.block_size
    sd = {}
    for k, v in src.state_dict().items():
        if k == 'lm_head.weight':
            continue
        v = v.t().contiguous() if k.endswith(CONV1D) else v.clone()
        sd[k if lm_head else k.removeprefix('transformer.')] = v
    for i in range(src.config.n_layer):
        pre = 'transformer.' if lm_head else ''
        sd[f'{pre}h.{i}.attn.bias'] = torch.tril(torch.ones(T, T)).view(1, 1, T, T)
        sd[f'{pre}h.{i}.attn.masked_bias'] = torch.tensor(-1e4)
    if lm_head:
        sd['lm_head.weight'] = src.lm_head.weight.detach().clone()
    return sd


@pytest.mark.parametrize('lm_head', [False, True])
def test_load_gpt2_hf_layout_gives_identical_logits(lm_head):
    torch.manual_seed(8)
    cfg = GPTConfig(block_size=16, vocab_size=97, n_layer=2, n_head=2, n_embd=128)
    src = GPT(cfg).eval()
    with torch.no_grad():  # non-trivial LayerNorm parameters and biases
        for name, p in src.named_parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    config, sd = load_gpt2_state_dict(hf_state_dict(src, lm_head))
    assert (config.n_layer, config.n_head, config.n_embd, config.vocab_size, config.block_size) == (2, 2, 128, 97, 16)
    dst = GPT(config)
    load_model_state(dst, sd, 'hf')
    dst.eval()
    idx = torch.randint(97, (2, 16))
    with torch.no_grad():
        assert torch.equal(dst(idx)[0], src(idx)[0])
    # a nanoGPT checkpoint dict ({'model': ...}) loads too
    config2, sd2 = load_gpt2_state_dict({'model': src.state_dict()})
    dst2 = GPT(config2)
    load_model_state(dst2, sd2, 'nanogpt')
    with torch.no_grad():
        assert torch.equal(dst2.eval()(idx)[0], src(idx)[0])


def test_load_gpt2_rejects_non_weights():
    with pytest.raises(SystemExit, match='no GPT-2 weights'):
        load_gpt2_state_dict({'foo': torch.zeros(2)})
    real = GPT(GPTConfig(n_layer=1, n_head=1, n_embd=64, vocab_size=50, block_size=8)).state_dict()
    narrow = GPT(GPTConfig(n_layer=1, n_head=1, n_embd=32, vocab_size=50, block_size=8)).state_dict()
    for broken in ({'transformer.wte.weight': torch.zeros(50, 64)},  # no wpe, no blocks
                   {**real, 'transformer.wte.weight': 1},  # not a tensor
                   {**real, 'transformer.wte.weight': torch.zeros(50)},  # 1-D
                   {k: v for k, v in real.items() if not k.startswith('transformer.h.')},
                   narrow):  # n_embd 32: GPT-2's n_head = n_embd // 64 would be 0
        with pytest.raises(SystemExit) as e:
            load_gpt2_state_dict(broken)
        assert str(e.value).startswith('error: init_from file is not GPT-2 weights: ') and '\n' not in str(e.value)
    assert load_gpt2_state_dict(real)[0].n_head == 1


# ---------------------------------------------------------------- samplers

def test_generate_shapes_and_window():
    torch.manual_seed(9)
    m = GPT(tiny()).eval()
    idx = torch.randint(50, (3, 4))
    out = m.generate(idx, 20, temperature=0.9, top_k=5)  # 24 > block_size 16: the window crops
    assert out.shape == (3, 24) and out.dtype == torch.long
    assert torch.equal(out[:, :4], idx) and (out >= 0).all() and (out < 50).all()


def test_generate_stop_token_ends_a_row_and_only_that_row():
    """Against the same draws without a stop token: a row that samples 7 keeps its tokens up to
    that first 7, then emits only 7; a row that never samples it is the unstopped row exactly."""
    torch.manual_seed(9)
    m = GPT(tiny()).eval()
    idx = torch.randint(50, (8, 4))
    torch.manual_seed(1)
    free = m.generate(idx, 12, temperature=5.0)[:, 4:].tolist()
    torch.manual_seed(1)
    stopped = m.generate(idx, 12, temperature=5.0, stop_token=7)[:, 4:].tolist()
    assert 0 < sum(7 in row for row in free) < len(free)  # both kinds of row are here
    for f, s in zip(free, stopped):
        end = f.index(7) + 1 if 7 in f else len(f)
        assert s == f[:end] + [7] * (len(f) - end)


def test_generate_masked_fills_every_mask():
    torch.manual_seed(10)
    V = 51
    m = GPT(tiny(vocab_size=V, causal=False)).eval()
    mask_id = M.mask_id(V)
    idx = torch.randint(mask_id, (4, 12))
    holes = torch.rand(4, 12) < 0.5
    holes[0] = True  # one all-[MASK] row, as sample.py uses
    idx[holes] = mask_id
    for steps in (1, 3, 10, 20):
        out = m.generate_masked(idx, mask_id, steps=steps, top_k=10)
        assert out.shape == idx.shape
        assert not (out == mask_id).any()
        assert torch.equal(out[~holes], idx[~holes])
    assert (idx == mask_id).sum() == holes.sum()  # the input is not modified


def test_generate_masked_draws_from_the_decoder():
    """BERT's mask-predict samples from decoder_logits' distribution, as GPT's generate does: a nucleus
    of one token (top_p below the top token's mass) is greedy, token for token; plain sampling is not."""
    torch.manual_seed(11)
    V = 51
    m = GPT(tiny(vocab_size=V, causal=False)).eval()
    idx = torch.full((8, 12), M.mask_id(V))
    draw = lambda **decoder: m.generate_masked(idx, M.mask_id(V), steps=4, **decoder)
    greedy = draw(temperature=0)
    assert torch.equal(draw(top_p=1e-6), greedy)
    assert not torch.equal(draw(), greedy)  # 96 positions over 50 tokens: sampling is not greedy


def test_mask_predict_keeps_the_positions_the_model_is_surest_of():
    """Each round keeps the positions whose drawn token the model (not the decoder) gives the most probability:
    under greedy decoding every drawn token has decoder probability 1, a tie. Two [MASK]s, two rounds: the surer
    position (here the second, so an order by index would differ) is filled first, the other given it."""
    torch.manual_seed(21)
    V = 51
    m = GPT(tiny(vocab_size=V, causal=False)).eval()
    mask = M.mask_id(V)
    idx = torch.full((1, 2), mask)

    def greedy_fill(filled, position):
        with torch.no_grad():
            logits, _ = m(filled)
        logits[..., mask] = -float('inf')
        filled = filled.clone()
        filled[0, position] = logits[0, position].argmax()
        return filled, logits.softmax(-1).amax(-1)[0]  # and each position's top probability
    _, surest = greedy_fill(idx, 0)
    first = int(surest.argmax())
    assert first == 1
    expected = greedy_fill(greedy_fill(idx, first)[0], 1 - first)[0]
    assert not torch.equal(expected, greedy_fill(greedy_fill(idx, 1 - first)[0], first)[0])  # the order matters
    assert torch.equal(m.generate_masked(idx, mask, steps=2, temperature=0), expected)

"""GPT sampling: the key/value cache gives the tokens of the recomputing sampler it replaces,
the decoders (greedy, temperature, top-k, top-p), and sample_texts' progress line. Tiny models,
float32 on the CPU, every random test seeded."""
from contextlib import contextmanager
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import sample
from model import GPT, GPTConfig, KVCache, sample_next


def tiny(**kw):
    args = dict(block_size=16, vocab_size=50, n_layer=2, n_head=2, n_embd=32)
    args.update(kw)
    return GPTConfig(**args)


def model(seed=0, **kw):
    torch.manual_seed(seed)
    m = GPT(tiny(**kw)).eval()
    with torch.no_grad():  # logits sharper than at GPT-2's init, so that samples depend on the context
        m.transformer.ln_f.weight.mul_(4)
    return m


@torch.no_grad()
def recomputing_generate(m, idx, max_new_tokens, temperature=1.0, top_k=None, stop_token=None):
    """generate as it was before the cache: every step runs the whole window (cropped to
    block_size) and the head at every position."""
    done = torch.zeros(idx.size(0), dtype=torch.bool)
    for _ in range(max_new_tokens):
        logits, _ = m(idx[:, -m.config.block_size:])
        logits = logits[:, -1, :] / max(temperature, 1e-8)
        if top_k is not None:
            v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
            logits[logits < v[:, [-1]]] = -float('inf')
        idx_next = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)
        if stop_token is not None:
            idx_next[done] = stop_token
            done |= idx_next.squeeze(1) == stop_token
        idx = torch.cat((idx, idx_next), dim=1)
    return idx


def seeded(fn, *args, seed=5, **kw):
    torch.manual_seed(seed)
    return fn(*args, **kw)


# ---------------------------------------------------------------- the cache

UNITS = [dict(), dict(dtu_r=0.5), dict(dmu_p=0.5), dict(dmu_p=0.5, dmu_mode='prob'), dict(dropout=0.1)]
DECODERS = [dict(), dict(top_k=5), dict(temperature=0.7, stop_token=3), dict(temperature=1.3, top_k=10, stop_token=7)]


@pytest.mark.parametrize('units', UNITS, ids=lambda u: ','.join(f'{k}={v}' for k, v in u.items()) or 'plain')
@pytest.mark.parametrize('decoder', DECODERS, ids=lambda d: ','.join(f'{k}={v}' for k, v in d.items()) or 't=1')
def test_cache_gives_the_tokens_of_the_recomputing_sampler(units, decoder):
    """Same seed, same tokens: with the cache, without it, and the sampler from before the
    cache. DTU, DMU and dropout are off in eval mode, so their models are cached too. 4 + 20
    tokens pass block_size 16: the last steps crop and recompute."""
    m = model(**units)
    idx = torch.randint(50, (6, 4), generator=torch.Generator().manual_seed(1))
    ref = seeded(recomputing_generate, m, idx, 20, **decoder)
    assert torch.equal(seeded(m.generate, idx, 20, **decoder), ref)
    assert torch.equal(seeded(m.generate, idx, 20, use_cache=False, **decoder), ref)
    if 'stop_token' in decoder:
        assert (ref[:, 4:] == decoder['stop_token']).any()  # the stop token was exercised


def attention_lengths(m):
    """The sequence lengths the first attention layer is run on, appended to as it runs."""
    lengths = []
    m.transformer.h[0].attn.register_forward_hook(lambda mod, args, out: lengths.append(args[0].size(1)))
    return lengths


def test_cache_runs_the_prompt_then_one_token_per_step_then_crops():
    m = model()
    lengths = attention_lengths(m)
    m.generate(torch.zeros(2, 5, dtype=torch.long), 14)
    assert lengths == [5] + [1] * 11 + [16] * 2  # 5 + 11 = block_size; then 17, 18 tokens are cropped to 16
    lengths.clear()
    m.generate(torch.zeros(2, 5, dtype=torch.long), 3, use_cache=False)
    assert lengths == [5, 6, 7]


def test_training_mode_recomputes():
    """In training mode DTU draws its dimensions from the whole window at every step, which a
    cache cannot replay: generate recomputes, so use_cache changes nothing."""
    m = model(dtu_r=0.5).train()
    lengths = attention_lengths(m)
    idx = torch.zeros(3, 2, dtype=torch.long)
    out = seeded(m.generate, idx, 10)
    assert lengths == list(range(2, 12))
    assert torch.equal(out, seeded(m.generate, idx, 10, use_cache=False))


def test_cache_buffers_are_preallocated_in_the_dtype_of_the_keys():
    cache = KVCache(block_size=8)
    k = torch.randn(2, 3, 5, 4, dtype=torch.bfloat16)  # (B, nh, T, hs)
    keys, values = cache.append(k, -k)
    assert cache.k.shape == cache.v.shape == (2, 3, 8, 4) and cache.k.dtype == torch.bfloat16
    assert torch.equal(keys, k) and torch.equal(values, -k) and cache.pos == 5
    buffer = cache.k.data_ptr()
    k1 = torch.randn(2, 3, 1, 4, dtype=torch.bfloat16)
    keys, _ = cache.append(k1, k1)
    assert cache.k.data_ptr() == buffer and keys.shape == (2, 3, 6, 4) and torch.equal(keys[:, :, 5:], k1)
    with pytest.raises(AssertionError, match='one token at a time'):
        cache.append(k[:, :, :2], k[:, :, :2])


def test_cache_under_bf16_autocast():
    m = model()
    idx = torch.zeros(4, 1, dtype=torch.long)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = seeded(m.generate, idx, 20, top_k=10, top_p=0.9)
    assert out.shape == (4, 21) and ((out >= 0) & (out < 50)).all()


@contextmanager
def no_host_reads():
    """Fail on what makes a GPU step wait for the device: reading a tensor's value into Python
    (bool, item, tolist) or indexing with a boolean mask (its size depends on the values)."""
    def refuse(*args):
        raise AssertionError('host read of a tensor value')

    def checked(method):
        def f(self, key, *rest):
            keys = key if isinstance(key, tuple) else (key,)
            if any(isinstance(k, torch.Tensor) and k.dtype == torch.bool for k in keys):
                raise AssertionError('boolean-mask indexing')
            return method(self, key, *rest)
        return f

    saved = {name: getattr(torch.Tensor, name) for name in ('__bool__', 'item', 'tolist', '__getitem__', '__setitem__')}
    try:
        torch.Tensor.__bool__ = torch.Tensor.item = torch.Tensor.tolist = refuse
        torch.Tensor.__getitem__ = checked(saved['__getitem__'])
        torch.Tensor.__setitem__ = checked(saved['__setitem__'])
        yield
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)


@pytest.mark.parametrize('decoder', [dict(top_k=5, stop_token=3), dict(temperature=0), dict(top_p=0.8)])
def test_generate_never_reads_tensor_values_on_the_host(decoder):
    m = model()
    with no_host_reads():
        m.generate(torch.zeros(2, 3, dtype=torch.long), 16, **decoder)


# ---------------------------------------------------------------- decoders

def test_greedy_is_the_argmax_continuation():
    m = model()
    idx = torch.randint(50, (3, 2), generator=torch.Generator().manual_seed(2))
    out = m.generate(idx, 18, temperature=0)
    ref = idx
    with torch.no_grad():
        for _ in range(18):
            logits, _ = m(ref[:, -16:])
            ref = torch.cat((ref, logits[:, -1].argmax(-1, keepdim=True)), dim=1)
    assert torch.equal(out, ref)


def test_tiny_top_p_is_greedy_and_top_p_1_is_plain_sampling():
    m = model()
    idx = torch.randint(50, (4, 3), generator=torch.Generator().manual_seed(3))
    assert torch.equal(seeded(m.generate, idx, 15, top_p=1e-6), m.generate(idx, 15, temperature=0))
    plain = seeded(recomputing_generate, m, idx, 15)
    assert torch.equal(seeded(m.generate, idx, 15, top_p=1.0), plain)
    assert not torch.equal(seeded(m.generate, idx, 15, top_p=0.5), plain)


def test_top_p_keeps_the_smallest_set_reaching_p():
    """Probabilities 0.5, 0.3, 0.15, 0.05: p=0.7 keeps the first two (0.5 < 0.7 <= 0.8), p=0.85
    the first three, p=0.45 the first alone; the kept ones keep their relative odds."""
    logits = torch.tensor([0.15, 0.5, 0.05, 0.3]).log().expand(20000, 4)
    torch.manual_seed(0)
    for p, kept in ((0.45, {1}), (0.7, {1, 3}), (0.85, {0, 1, 3}), (1.0, {0, 1, 2, 3})):
        draws = sample_next(logits, top_p=p).squeeze(1)
        assert set(draws.unique().tolist()) == kept
    draws = sample_next(logits, top_p=0.7).squeeze(1)
    assert abs((draws == 1).float().mean().item() - 0.5 / 0.8) < 0.02  # 20000 draws: se 0.0034, 0.02 = 5.8 se (false alarm 5e-9)


# ---------------------------------------------------------------- sample_texts

TOK = SimpleNamespace(eot=0, encode=lambda s: [1] * len(s), decode=lambda row: ' '.join(map(str, row)))


@pytest.mark.parametrize('causal', [True, False], ids=['gpt', 'bert'])
def test_sample_texts_decoders(causal):
    """GPT and BERT (mask-predict) alike: a one-token nucleus is greedy, top_p=1 is plain sampling."""
    m = model(causal=causal)
    greedy = sample.sample_texts(m, TOK, 5, 10, temperature=0)
    assert len(set(greedy)) == 1  # one prompt (or all-[MASK] row), one argmax continuation
    nucleus = sample.sample_texts(m, TOK, 5, 10, top_p=1e-6)
    assert nucleus == greedy
    assert sample.sample_texts(m, TOK, 5, 10, top_p=1.0) == sample.sample_texts(m, TOK, 5, 10) != greedy


def clock(monkeypatch, step):
    ticks = iter(range(1000))
    monkeypatch.setattr(sample, 'time', SimpleNamespace(perf_counter=lambda: next(ticks) * step))


def test_progress_line_for_long_runs_on_stderr(monkeypatch, capsys):
    clock(monkeypatch, 1.5)  # each batch takes 1.5 s
    sample.sample_texts(model(), TOK, 7, 4, batch_size=2)
    out, err = capsys.readouterr()
    assert out == ''
    assert err.splitlines() == ['sampling: 4/7 samples, eta 2s', 'sampling: 6/7 samples, eta 1s',
                                'sampling: 7/7 samples in 6s']


def test_no_progress_line_for_one_batch_or_a_fast_run(monkeypatch, capsys):
    clock(monkeypatch, 10.0)
    sample.sample_texts(model(), TOK, 3, 4, batch_size=3)  # one slow batch
    clock(monkeypatch, 0.1)
    sample.sample_texts(model(), TOK, 7, 4, batch_size=2)  # several fast ones
    assert capsys.readouterr() == ('', '')


def test_sample_py_takes_every_decoder_from_its_flags(tmp_path, capsys):
    """sample.py passes --top_p through: a nucleus of 1e-6 keeps only the most probable token, so it
    prints the greedy (--temperature=0) samples; plain sampling (top_p=1) prints others."""
    from conftest import run
    import sample
    run(tmp_path, iters=20)
    capsys.readouterr()  # the training run's output
    printed = {}
    for flags in (('--temperature=0',), ('--top_p=1e-6',), ('--top_p=1.0',)):
        sample.main([f'--out_dir={tmp_path}', '--num_samples=4', '--max_new_tokens=12', *flags])
        printed[flags[0]] = capsys.readouterr().out
    assert printed['--top_p=1e-6'] == printed['--temperature=0']
    assert printed['--top_p=1.0'] != printed['--temperature=0']  # 4 x 12 sampled tokens, none argmax-only


# ---------------------------------------------------------------- the prompt

def test_prompt_is_end_of_text_else_newline_else_token_0():
    """A text file's tokenizer has no end-of-text, so GPT starts from a newline; a one-line text's
    vocabulary has none either, and sampling (train.py's end of run) starts from token 0, not a KeyError."""
    from data import CharTokenizer, WordTokenizer
    assert sample.prompt_ids(WordTokenizer(['a', 'b']), '') == [2]
    assert sample.prompt_ids(CharTokenizer('\nab'), '') == [0] and sample.prompt_ids(CharTokenizer('ab\n'), '') == [2]
    no_newline = CharTokenizer([chr(ord('!') + i) for i in range(50)])
    assert sample.prompt_ids(no_newline, '') == [0] and sample.prompt_ids(no_newline, '#"') == [2, 1]
    with pytest.raises(SystemExit, match=r"^error: start=' ' is no token of this checkpoint's word vocabulary$"):
        sample.prompt_ids(WordTokenizer(['a', 'b']), ' ')  # it would index an empty prompt
    texts = sample.sample_texts(model(), no_newline, 3, 4)
    assert len(texts) == 3 and all(len(t) == 4 for t in texts)


def test_start_outside_the_vocabulary_is_one_line_naming_start():
    from data import CharTokenizer, GPT2Tokenizer, WordTokenizer, gpt2_encoding
    compact = GPT2Tokenizer(sorted(set(gpt2_encoding().encode_ordinary('the cat sat'))))
    for tok, start, missing in ((CharTokenizer('abc'), 'abX', "'X'"), (WordTokenizer(['the', 'cat']), 'the dog', "'dog'"),
                                (compact, 'the zebra', "' z'")):
        with pytest.raises(SystemExit) as error:
            sample.prompt_ids(tok, start)
        message = str(error.value)
        assert message.startswith(f'error: start={start!r} has {missing}, ') and tok.name in message and '\n' not in message

"""data.py's prepare (`python data.py --src=... --out=DIR`) and prepared bins: the tokens of the whole text in
small chunks, the three kinds of source, meta.json, one-line errors, no half-written DIR, and load_data's memmaps."""
import hashlib
import json
import os
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
import torch

import data
import metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# whitespace GPT-2 treats specially (runs, '\r\n', tabs, NBSP, ideographic space), contractions, digits, emoji,
# a literal end-of-text, accents: every way a chunk cut could change a token
PARAS = ["Hello world!  It's 2024:\tnaïve café, 100 tokens\r\n\r\nand a second    paragraph.\n",
         "Don't STOP, me-now! \u00a0 x\u3000y  \n\n\n  \u2028z <|endoftext|> 🙂🙂 ''quoted'' l'été\r",
         "ROMEO:\nBut soft, what light through yonder window breaks?\n   indented    line  \n"]


def tricky_text(n=400, seed=0):
    rng = np.random.default_rng(seed)
    return ''.join(PARAS[i] + ' ' * int(rng.integers(0, 3)) + str(k) for k, i in enumerate(rng.integers(0, 3, n)))


@pytest.fixture(scope='module')
def gpt2():
    return data.GPT2Tokenizer()


def bins(out):
    """(train ids, val ids, meta) of a prepared folder, read as plain arrays."""
    meta = json.load(open(os.path.join(out, 'meta.json')))
    ids = [np.fromfile(os.path.join(out, f'{s}.bin'), dtype=meta['dtype']) for s in data.SPLITS]
    return ids[0], ids[1], meta


def test_cut_keeps_gpt2_tokens(gpt2):
    text = tricky_text(60)
    whole = gpt2.encode(text)
    for end in range(1, len(text), 97):
        i = data.last_cut(text, end, window=50)
        assert i < end and (i == 0 or text[i] in ' \n' and not text[i - 1].isspace())
        assert gpt2.encode(text[:i]) + gpt2.encode(text[i:]) == whole, (end, i)


def test_word_rule_is_metrics(tmp_path):
    text = tricky_text(50) + "O'Brien's ÉCOLE über-cool x\u00ffy WORDS words"
    assert data.count_words(text) == metrics.word_counts(text)


@pytest.mark.parametrize('chunk_mb,threads', [(0.002, 2), (0.002, 1), (10.0, 2)])
def test_prepare_text_file_is_the_whole_texts_tokens(tmp_path, gpt2, chunk_mb, threads):
    src, out = tmp_path / 'corpus.txt', str(tmp_path / 'bins')
    src.write_bytes(tricky_text(2500).encode('utf-8'))  # 200 kB: chunk_mb=10 splits it among threads
    text = data.read_text(str(src))  # '\r\n' -> '\n', as prepare reads it
    meta = data.prepare(str(src), out, val_fraction=0.1, chunk_mb=chunk_mb, num_threads=threads)
    train, val, saved = bins(out)
    assert saved == meta and meta['dtype'] == 'uint16' and meta['tokenizer'] == {'name': 'gpt2', 'keep': None}
    assert np.concatenate([train, val]).tolist() == gpt2.encode(text)
    assert gpt2.decode(train.tolist()) + gpt2.decode(val.tolist()) == text
    s = meta['splits']
    assert (s['train']['tokens'], s['val']['tokens']) == (len(train), len(val))
    assert s['val']['bytes'] == len(gpt2.enc.decode_bytes(val.tolist()))
    assert s['train']['bytes'] + s['val']['bytes'] == len(text.encode('utf-8'))
    # the source's last tenth: cut a word before 90% of its bytes (~1e-4), '\r\n' read as '\n' (0.75% of them) moves the
    # share by < 1e-3 (measured 2.5e-5): 0.01 is 10x
    assert abs(s['val']['bytes'] / len(text.encode('utf-8')) - 0.1) < 0.01
    assert meta['source']['sha256'] == hashlib.sha256(src.read_bytes()).hexdigest()
    assert meta['source']['bytes'] == src.stat().st_size
    assert meta['word_counts'] == metrics.word_counts(text)
    assert not [p for p in os.listdir(tmp_path) if '.tmp-' in p]


def test_prepare_folder_char_and_jsonl_compact(tmp_path, gpt2):
    folder = tmp_path / 'docs'
    (folder / 'sub').mkdir(parents=True)
    files = {'b.txt': 'second file\n', 'a.txt': 'first file, no newline', 'sub/c.txt': 'third\r\nfile ü'}
    for name, text in files.items():
        (folder / name).write_text(text, encoding='utf-8', newline='')
    (folder / 'notes.md').write_text('not a .txt file')
    out = str(tmp_path / 'char')
    meta = data.prepare(str(folder), out, tokenizer='char', val_fraction=0.3, chunk_mb=0.00002)
    train, val, _ = bins(out)
    tok = data.tokenizer_from_state(meta['tokenizer'])
    assert tok.decode(np.concatenate([train, val]).tolist()) == 'first file, no newline\nsecond file\nthird\nfile ü\n'
    assert meta['source']['files'] == 3 and meta['dtype'] == 'uint16'
    docs = ['one doc. ' * 40, 'two\n', '', 'three 🙂 ' * 30]
    src = tmp_path / 'docs.jsonl'
    src.write_text(''.join(json.dumps({'text': d, 'id': i}) + '\n' for i, d in enumerate(docs)) + '\n')
    out = str(tmp_path / 'compact')
    meta = data.prepare(str(src), out, tokenizer='gpt2-compact', val_fraction=0.2, chunk_mb=0.0002)
    train, val, _ = bins(out)
    joined = ''.join(d if d.endswith('\n') else d + '\n' for d in docs)
    keep = meta['tokenizer']['keep']
    assert [keep[i] for i in np.concatenate([train, val])] == gpt2.encode(joined)
    assert keep == sorted(set(gpt2.encode(joined))) and meta['vocab_size'] == len(keep)
    assert meta['token_counts'] == np.bincount(train, minlength=len(keep)).tolist()  # compact ids, train only
    assert data.load_data(out, 'gpt2-compact').tok.decode(np.concatenate([train, val]).tolist()) == joined


def test_dtype_uint16_or_uint32(tmp_path):
    wide = ''.join(chr(0x10000 + i) for i in range(70_000)) + ' end\n'  # more characters than uint16 holds
    src = tmp_path / 'wide.txt'
    src.write_text(wide * 2, encoding='utf-8')
    meta = data.prepare(str(src), str(tmp_path / 'w'), tokenizer='char', val_fraction=0.3)
    train, val, _ = bins(str(tmp_path / 'w'))
    assert meta['dtype'] == 'uint32' and meta['vocab_size'] > 65536 and int(train.max()) >= 65536
    d = data.load_data(str(tmp_path / 'w'), 'auto')
    assert d.train.dtype == np.uint32 and d.tok.decode(np.concatenate([d.train, d.val]).tolist()) == wide * 2
    src.write_text('small alphabet ' * 50)
    assert data.prepare(str(src), str(tmp_path / 's'), tokenizer='char', val_fraction=0.3)['dtype'] == 'uint16'


def run_prepare(*args, code=''):
    """python data.py ARGS in a subprocess (after `code`, e.g. a patch) -> CompletedProcess."""
    script = f"import sys, data\n{code}\ndata.main(sys.argv[1:])"
    return subprocess.run([sys.executable, '-c', script, *args], capture_output=True, text=True, cwd=ROOT, timeout=120)


def bad_inputs(tmp):
    (tmp / 'empty.txt').write_bytes(b'')
    (tmp / 'blank.txt').write_bytes(b'  \n\t\r\n ')
    (tmp / 'nodocs').mkdir()
    (tmp / 'nodocs' / 'x.md').write_text('hi')
    (tmp / 'bad.txt').write_bytes(b'hello world ' * 1000 + b'\xff rest')
    (tmp / 'split.txt').write_bytes(b'a' * 1998 + b' \xc3(' + b' b' * 100)  # a 2-byte start at byte 1999, read 1 ends
    (tmp / 'bad.jsonl').write_text('{"text": "fine"}\n{"txt": "no text field"}\n')
    (tmp / 'tiny.txt').write_text('hi')
    (tmp / 'ok.txt').write_text('fine text ' * 100)
    (tmp / 'exists').mkdir()
    (tmp / 'exists' / 'precious.py').write_text('x = 1')
    return [(['--src=' + str(tmp / 'missing.txt')], 'does not exist'), (['--src=' + str(tmp / 'empty.txt')], 'is empty'),
            (['--src=' + str(tmp / 'blank.txt')], 'is empty'), (['--src=' + str(tmp / 'nodocs')], 'no .txt files'),
            (['--src=' + str(tmp / 'bad.txt')], f"{str(tmp / 'bad.txt')!r} is not UTF-8 text (invalid start byte at byte 12000)"),
            (['--src=' + str(tmp / 'split.txt'), '--chunk_mb=0.002'], 'invalid continuation byte at byte 1999'),
            (['--src=' + str(tmp / 'bad.jsonl')], 'line 2 is not a JSON object with a "text"'),
            (['--src=' + str(tmp / 'tiny.txt')], 'too small to split'),
            (['--src=' + str(tmp / 'ok.txt'), '--tokenizer=word'], 'not one of gpt2 | gpt2-compact | char'),
            (['--src=' + str(tmp / 'ok.txt'), '--val_fraction=1.5'], 'val_fraction=1.5 is not a float in (0, 1)'),
            (['--src=' + str(tmp / 'ok.txt'), '--out=' + str(tmp / 'exists')], 'exists; pass --overwrite=True'),
            (['--src=' + str(tmp / 'ok.txt'), '--out=' + str(tmp / 'exists'), '--overwrite=True'], 'refusing to replace'),
            (['--src=' + str(tmp / 'ok.txt'), '--out=' + str(tmp / 'ok.txt' / 'bins')], 'cannot make'),  # under a file
            ([], 'usage: python data.py --src=')]


def test_bad_inputs_are_one_line_errors(tmp_path):
    for args, match in bad_inputs(tmp_path):
        if args and not any(a.startswith('--out=') for a in args):
            args = args + ['--out=' + str(tmp_path / 'out')]
        r = run_prepare(*args)
        assert r.returncode == 1 and 'Traceback' not in r.stderr, (args, r.stderr)
        assert r.stderr.count('\n') == 1 and r.stderr.startswith('error: ') and match in r.stderr, (args, r.stderr)
        assert not os.path.exists(tmp_path / 'out') and not [p for p in os.listdir(tmp_path) if '.tmp-' in p]
    assert (tmp_path / 'exists' / 'precious.py').exists()


def test_help_lists_the_keys():
    r = run_prepare('--help')
    assert r.returncode == 0 and '--src=' in r.stdout and "--tokenizer='gpt2'" in r.stdout and 'val_fraction' in r.stdout


@pytest.fixture(scope='module')
def prepared(tmp_path_factory):
    """A small gpt2 corpus prepared once: (source path, DIR)."""
    tmp = tmp_path_factory.mktemp('prepared')
    src = tmp / 'corpus.txt'
    src.write_text(tricky_text(800), encoding='utf-8')
    data.prepare(str(src), str(tmp / 'bins'), val_fraction=0.1, chunk_mb=0.02)
    return str(src), str(tmp / 'bins')


def interrupt_at(n, exc):
    """A patched data.encode_chunk that raises exc on its n-th call."""
    real, calls = data.encode_chunk, []

    def encode_chunk(*args):
        calls.append(1)
        if len(calls) == n:
            raise exc
        return real(*args)
    return encode_chunk


def test_interrupted_prepare_leaves_no_dir(tmp_path, monkeypatch, prepared):
    src, good = prepared
    out = str(tmp_path / 'bins')
    monkeypatch.setattr(data, 'encode_chunk', interrupt_at(3, KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        data.prepare(src, out, chunk_mb=0.005)
    assert os.listdir(tmp_path) == []
    with pytest.raises(SystemExit, match='does not exist'):
        data.load_data(out, 'auto')
    # over an existing DIR (overwrite=True), the old bins stay until the new ones are complete
    shutil_copy(good, out)
    monkeypatch.setattr(data, 'encode_chunk', interrupt_at(3, KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        data.prepare(src, out, chunk_mb=0.005, overwrite=True)
    assert os.listdir(tmp_path) == ['bins'] and len(data.load_data(out, 'auto').train)


def test_killed_or_terminated_prepare(tmp_path, prepared):
    src, out = prepared[0], str(tmp_path / 'bins')
    patch = "import os, signal\nreal = data.encode_chunk\ncalls = []\ndef encode_chunk(*a):\n    calls.append(1)\n" \
            "    if len(calls) == 3: os.kill(os.getpid(), signal.{})\n    return real(*a)\ndata.encode_chunk = encode_chunk"
    r = run_prepare(f'--src={src}', f'--out={out}', '--chunk_mb=0.005', code=patch.format('SIGKILL'))
    assert r.returncode == -9 and not os.path.exists(out)
    tmp, = [str(tmp_path / p) for p in os.listdir(tmp_path)]  # the killed run's DIR.tmp-<pid>, half-written
    assert '.tmp-' in tmp and os.path.getsize(os.path.join(tmp, 'train.bin')) > 0
    with pytest.raises(SystemExit, match='not prepared bins'):
        data.load_data(tmp, 'auto')
    r = run_prepare(f'--src={src}', f'--out={out}', '--chunk_mb=0.005', code=patch.format('SIGTERM'))
    assert r.returncode == 1 and r.stderr.strip().endswith('was not written') and 'Traceback' not in r.stderr
    assert os.listdir(tmp_path) == [os.path.basename(tmp)]  # SIGTERM: cleaned up


def test_load_bins_memmap(prepared, gpt2):
    src, out = prepared
    d = data.load_data(out, 'auto')
    train, val, tok, text, corpus = d
    assert isinstance(train, np.memmap) and isinstance(val, np.memmap) and not train.flags.writeable
    assert train.dtype == np.uint16 and tok.name == 'gpt2' and corpus is None
    assert np.concatenate([train, val]).tolist() == gpt2.encode(open(src).read())
    assert open(src).read().startswith(text) and len(text) > 1000
    assert d.split_bytes == {s: d.meta['splits'][s]['bytes'] for s in data.SPLITS}
    assert d.word_counts == metrics.word_counts(open(src).read()) and isinstance(d.word_counts, Counter)
    assert d.bits_per_byte(2.0) == pytest.approx(2.0 * len(val) / (d.split_bytes['val'] * np.log(2)), rel=1e-12)  # fp64
    assert data.load_data(out, 'gpt2').tok.name == 'gpt2'
    # BAARA's rarity reads the training split's token counts from meta.json, never the bins themselves
    assert d.token_counts.tolist() == np.bincount(np.asarray(train), minlength=tok.vocab_size).tolist()
    x, y = data.get_batch(train, 4, 16, torch.Generator().manual_seed(0), 'cpu')
    x2, y2 = data.get_batch(np.array(train, dtype=np.int32), 4, 16, torch.Generator().manual_seed(0), 'cpu')
    assert x.dtype == torch.long and torch.equal(x, x2) and torch.equal(y, y2)


def one_line_error(folder, tokenizer='auto'):
    with pytest.raises(SystemExit) as e:
        data.load_data(folder, tokenizer)
    msg = str(e.value.code)
    assert msg.startswith('error: ') and '\n' not in msg
    return msg


def test_bins_errors(tmp_path, prepared):
    src, good = prepared
    assert 'holds gpt2 tokens, not char' in one_line_error(good, 'char')
    msg = one_line_error(str(tmp_path))
    assert 'not prepared bins (no meta.json)' in msg and 'python data.py --src=' in msg
    out = str(tmp_path / 'bins')

    def broken(name, change):
        shutil_copy(good, out)
        change(os.path.join(out, name))
        return one_line_error(out)
    assert 'truncated' in broken('train.bin', lambda p: os.truncate(p, os.path.getsize(p) - 2))
    assert 'does not match its meta.json' in broken('val.bin', lambda p: open(p, 'r+b').write(b'\x01\x02'))
    assert 'is missing' in broken('val.bin', os.remove)
    assert 'not a prepared-bins meta.json' in broken('meta.json', lambda p: open(p, 'w').write('{"dtype": "uint16"}'))
    assert 'not a prepared-bins meta.json' in broken('meta.json', lambda p: open(p, 'w').write('{not json'))


def edit_meta(change):
    """A meta.json editor for broken(): change(meta) edits the parsed dict in place."""
    def edit(path):
        meta = json.load(open(path))
        change(meta)
        json.dump(meta, open(path, 'w'))
    return edit


@pytest.mark.parametrize('tokenizer, change, why', [
    ('gpt2', lambda m: m['tokenizer'].update(name='gpt2-compact'), 'tokenizer'),  # no ids kept: not compact
    ('gpt2', lambda m: m.update(vocab_size=50304), 'vocab_size'),
    ('gpt2', lambda m: m.update(dtype='uint32'), 'dtype'),  # 50257 ids are uint16 bins
    ('gpt2', lambda m: m['splits']['val'].update(bytes=1), 'splits'),  # fewer bytes than tokens: bits per byte off
    ('gpt2', lambda m: m['token_counts'].__setitem__(0, -1), 'token_counts'),
    ('gpt2', lambda m: m['token_counts'].__setitem__(0, m['token_counts'][0] + 1), 'token_counts'),  # not the bins' count
    ('char', lambda m: m['tokenizer']['chars'].reverse(), 'tokenizer'),  # the ids would read as other characters
    ('char', lambda m: m['tokenizer']['chars'].pop(), 'vocab_size'),
    ('char', lambda m: m['tokenizer'].update(chars=list(range(len(m['tokenizer']['chars'])))), 'tokenizer'),
    ('char', lambda m: m.update(tokenizer={'name': 'gpt2', 'keep': None}), 'vocab_size'),
    ('char', lambda m: m['tokenizer'].pop('chars'), "KeyError: 'chars'")])
def test_meta_that_cannot_describe_its_bins_is_one_line(tmp_path, prepared, tokenizer, change, why):
    """meta.json is checked against its tokenizer and its own counts before anything trains (each edit once
    ran, silently or into a traceback)."""
    src, good = prepared
    if tokenizer == 'char':
        good = str(tmp_path / 'char')
        data.prepare(src, good, tokenizer='char', val_fraction=0.1)
    out = str(tmp_path / 'bins')
    shutil_copy(good, out)
    edit_meta(change)(os.path.join(out, 'meta.json'))
    msg = one_line_error(out)
    assert 'not a prepared-bins meta.json' in msg and why in msg


def shutil_copy(a, b):
    import shutil
    shutil.rmtree(b, ignore_errors=True)
    shutil.copytree(a, b)


def test_overwrite_replaces_bins(tmp_path, prepared):
    src, _ = prepared
    out = str(tmp_path / 'bins')
    data.prepare(src, out, tokenizer='char', val_fraction=0.1)
    data.prepare(src, out, tokenizer='gpt2', val_fraction=0.1, overwrite=True)
    assert data.load_data(out, 'auto').tok.name == 'gpt2' and os.listdir(tmp_path) == ['bins']


SHAKESPEARE = os.path.join(ROOT, '..', 'shared', 'data', 'tinyshakespeare.txt')


def arrays_digest(*arrays):
    return hashlib.sha256(b''.join(a.dtype.str.encode() + a.tobytes() for a in arrays)).hexdigest()[:16]


def test_in_memory_arrays_unchanged_and_split_bytes(tmp_path):
    """The synthetic corpus and text files load bit-identically to before prepared bins existed (digests taken
    then), and now also say how many UTF-8 bytes each split holds."""
    d = data.load_data('synthetic', 'auto', n_sentences=2000)
    assert arrays_digest(d.train, d.val) == 'b6faa9b9ecf002fc'
    assert d.split_bytes['val'] == len(d.tok.decode(d.val.tolist()).encode())
    assert sum(d.split_bytes.values()) == len(d.text.encode())
    assert d.word_counts == metrics.word_counts(d.text)
    if os.path.isfile(SHAKESPEARE):
        for tokenizer, digest in [('auto', '4aca862d64d592c7'), ('char', 'c89a67153dbafc18')]:
            d = data.load_data(SHAKESPEARE, tokenizer)
            assert arrays_digest(d.train, d.val) == digest, tokenizer
    path = tmp_path / 'f.txt'
    path.write_text(tricky_text(30), encoding='utf-8')
    d = data.load_data(str(path), 'auto')
    keep = d.tok.keep
    assert d.split_bytes['val'] == len(d.tok.enc.decode_bytes([keep[i] for i in d.val]))
    assert sum(d.split_bytes.values()) == len(d.text.encode())


def test_crlf_cut_between_reads_and_changed_source(tmp_path, monkeypatch):
    src = tmp_path / 'crlf.txt'
    src.write_bytes(b'a' * 1999 + b'\r\n' + b'b c\r\nd\re\r\n' * 40)  # the first 2000-byte read ends with '\r'
    meta = data.prepare(str(src), str(tmp_path / 'bins'), tokenizer='char', val_fraction=0.01, chunk_mb=0.002)
    train, val, _ = bins(str(tmp_path / 'bins'))
    assert data.tokenizer_from_state(meta['tokenizer']).decode(np.concatenate([train, val]).tolist()) == data.read_text(str(src))
    real = data.char_alphabet  # a source that changes between char's two passes is refused

    def alphabet_then_append(source, chunk):
        out = real(source, chunk)
        with open(src, 'ab') as f:
            f.write('new characters: ¿ñ?\n'.encode())
        return out
    monkeypatch.setattr(data, 'char_alphabet', alphabet_then_append)
    with pytest.raises(SystemExit, match='changed while it was read'):
        data.prepare(str(src), str(tmp_path / 'again'), tokenizer='char', val_fraction=0.2)
    assert sorted(os.listdir(tmp_path)) == ['bins', 'crlf.txt']


def test_get_batch_reads_only_its_windows(tmp_path):
    """A 200 MB memmap: a batch allocates its windows, not the array (int64 conversion after slicing)."""
    import tracemalloc
    path = tmp_path / 'big.bin'
    with open(path, 'wb') as f:
        f.truncate(200_000_000)  # sparse: 100M uint16 zeros, nothing written
    ids = np.memmap(path, dtype=np.uint16, mode='r')
    tracemalloc.start()
    x, y = data.get_batch(ids, 8, 64, torch.Generator().manual_seed(0), 'cpu')
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert x.shape == (8, 64) and x.dtype == torch.long and peak < 1_000_000, peak


def refused_line(r):
    """A refused run: a non-zero exit, one stderr line 'error: ...' and no traceback. -> that line."""
    assert r.returncode != 0 and 'Traceback' not in r.stderr and r.stderr.count('\n') == 1, r.stderr
    assert r.stderr.startswith('error: '), r.stderr
    return r.stderr.rstrip('\n')


@pytest.mark.parametrize('flag,line', [
    ('--val_fraction=0', 'val_fraction=0.0 is not a float in (0, 1)'),
    ('--val_fraction=1', 'val_fraction=1.0 is not a float in (0, 1)'),
    ('--chunk_mb=0', 'chunk_mb=0.0 is not a float in (0, 1024]'),
    ('--chunk_mb=1e999', 'chunk_mb=inf is not a float in (0, 1024]'),  # was an OverflowError
    ('--chunk_mb=1e300', 'chunk_mb=1e+300 is not a float in (0, 1024]'),  # finite, but f.read would allocate it
    ('--num_threads=-1', 'num_threads=-1 is not an int >= 0')])
def test_each_bad_key_is_a_line_naming_it_and_its_rule(tmp_path, flag, line):
    (tmp_path / 'ok.txt').write_text('fine text ' * 100)
    r = run_prepare(f"--src={tmp_path / 'ok.txt'}", f"--out={tmp_path / 'out'}", flag)
    assert refused_line(r) == 'error: ' + line and not os.path.exists(tmp_path / 'out')


@pytest.mark.skipif(not hasattr(os, 'mkfifo'), reason='no FIFOs here')
def test_source_that_is_not_a_regular_file(tmp_path):
    """A FIFO or a device exists but is no text: named as such, not 'empty' (its size) and never read."""
    os.mkfifo(tmp_path / 'fifo')
    for src in (str(tmp_path / 'fifo'), os.devnull):
        r = run_prepare(f'--src={src}', f"--out={tmp_path / 'out'}")
        assert refused_line(r) == f"error: source {src!r} is not a regular file (nor a folder of .txt files)"

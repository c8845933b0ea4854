"""checkpoint.load_checkpoint reads Hugging Face's .safetensors weights (GPT-2 layout, with or without 'transformer.',
or nanoGPT's) into what the torch-file path gives; safetensors is imported only for such a file."""
import subprocess
import sys

import pytest
import torch

import checkpoint as M

CONFIG = dict(n_layer=2, n_embd=64, vocab_size=50257, n_positions=64)


def hf_gpt2_weights(seed=0):
    """Random weights with GPT2Model's keys and shapes (Conv1D matrices stored (in, out))."""
    g = torch.Generator().manual_seed(seed)
    d, sd = CONFIG['n_embd'], {}
    shapes = {'wte.weight': (CONFIG['vocab_size'], d), 'wpe.weight': (CONFIG['n_positions'], d),
              'ln_f.weight': (d,), 'ln_f.bias': (d,)}
    for i in range(CONFIG['n_layer']):
        shapes.update({f'h.{i}.ln_1.weight': (d,), f'h.{i}.ln_1.bias': (d,), f'h.{i}.ln_2.weight': (d,),
                       f'h.{i}.ln_2.bias': (d,), f'h.{i}.attn.c_attn.weight': (d, 3 * d), f'h.{i}.attn.c_attn.bias': (3 * d,),
                       f'h.{i}.attn.c_proj.weight': (d, d), f'h.{i}.attn.c_proj.bias': (d,),
                       f'h.{i}.mlp.c_fc.weight': (d, 4 * d), f'h.{i}.mlp.c_fc.bias': (4 * d,),
                       f'h.{i}.mlp.c_proj.weight': (4 * d, d), f'h.{i}.mlp.c_proj.bias': (d,)})
    return {k: torch.randn(s, generator=g) for k, s in shapes.items()}


def assert_same(a, b):
    (ca, sa), (cb, sb) = a, b
    assert ca == cb and sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize('layout', ['GPT2Model', 'GPT2LMHeadModel', 'nanoGPT'])
def test_safetensors_loads_like_a_torch_file(tmp_path, layout):
    save_file = pytest.importorskip('safetensors.torch').save_file
    sd = hf_gpt2_weights()
    if layout == 'GPT2LMHeadModel':
        sd = {'transformer.' + k: v for k, v in sd.items()} | {'lm_head.weight': sd['wte.weight'].clone()}
    if layout == 'nanoGPT':  # already transposed to nn.Linear's (out, in), 'transformer.' prefix
        sd = M.load_gpt2_state_dict(sd)[1]
        sd = {k: v.clone() for k, v in sd.items()}  # lm_head shares wte's storage, which safetensors refuses
    save_file(sd, str(tmp_path / 'model.safetensors'))
    torch.save(sd, str(tmp_path / 'model.pt'))
    loaded = M.load_checkpoint(str(tmp_path / 'model.safetensors'))
    assert loaded.keys() == sd.keys() and all(torch.equal(loaded[k], sd[k]) for k in sd)
    got = M.load_gpt2_state_dict(loaded)
    assert_same(got, M.load_gpt2_state_dict(M.load_checkpoint(str(tmp_path / 'model.pt'))))
    config, weights = got
    assert (config.n_layer, config.n_embd, config.vocab_size, config.block_size) == (2, 64, 50257, 64)
    assert weights['transformer.h.1.attn.c_attn.weight'].shape == (192, 64)  # Conv1D (in, out) -> Linear (out, in)


def test_safetensors_errors(tmp_path, monkeypatch):
    path = tmp_path / 'model.safetensors'
    path.write_bytes(b'not a safetensors file')
    with monkeypatch.context() as m:
        m.setitem(sys.modules, 'safetensors', None)  # as if it were not installed
        m.setitem(sys.modules, 'safetensors.torch', None)
        with pytest.raises(SystemExit, match='pip install safetensors'):
            M.load_checkpoint(str(path))
    pytest.importorskip('safetensors.torch')
    with pytest.raises(SystemExit, match='corrupt or not a safetensors file'):
        M.load_checkpoint(str(path))


def test_torch_files_do_not_import_safetensors(tmp_path):
    torch.save({'x': torch.zeros(2)}, str(tmp_path / 'ckpt.pt'))
    code = f"import sys, checkpoint; checkpoint.load_checkpoint({str(tmp_path / 'ckpt.pt')!r}); print('safetensors' in sys.modules)"
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=M.__file__.rsplit('/', 1)[0])
    assert r.returncode == 0 and r.stdout.strip() == 'False', r.stderr

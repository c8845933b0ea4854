"""--init_from=PATH, fine-tuning GPT-2 weights: the run's config takes their shape, so that the checkpoint
describes its model and --init_from=resume rebuilds it; settings the weights cannot serve are one-line errors
that leave out_dir as it was."""
import os

import pytest
import torch

import data
import train
from model import GPT, GPTConfig

# a tiny GPT-2 in nanoGPT's layout: n_head is n_embd // 64 in GPT-2's weights; the vocabulary padded as nanoGPT pads it
SHAPE = dict(n_layer=2, n_head=1, n_embd=64, block_size=48, bias=True)
FLAGS = ['--max_iters=2', '--batch_size=4', '--eval_iters=1', '--eval_interval=2', '--log_interval=1', '--num_samples=2',
         '--sample_tokens=8', '--device=cpu', '--dtype=float32']


@pytest.fixture(scope='module')
def weights(tmp_path_factory):
    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp('gpt2') / 'gpt2.pt')
    torch.save({'model': GPT(GPTConfig(**SHAPE, vocab_size=50304)).state_dict()}, path)
    return path


def error_line(out, *flags):
    """The one-line error of a train.py run that must not start; out_dir is left as it was (absent)."""
    with pytest.raises(SystemExit) as e:
        train.main([f'--out_dir={out}', *FLAGS, *flags])
    msg = str(e.value.code)
    assert msg.startswith('error: ') and '\n' not in msg
    assert not os.path.exists(out)
    return msg


def test_finetuned_run_records_the_weights_shape_and_resumes(tmp_path, weights):
    out = str(tmp_path / 'run')
    train.main([f'--out_dir={out}', f'--init_from={weights}', '--block_size=32', '--n_layer=2', *FLAGS])  # theirs: fine
    train.main([f'--out_dir={out}', '--init_from=resume', '--max_iters=4'])  # the model is rebuilt from the config
    ckpt = torch.load(os.path.join(out, 'ckpt.pt'), weights_only=False)
    c, model = ckpt['config'], ckpt['model_args']
    assert ckpt['iter_num'] == 4
    assert {k: c[k] for k in SHAPE} == {**SHAPE, 'block_size': 32} == {k: model[k] for k in SHAPE}
    assert c['tokenizer'] == 'gpt2' and model['vocab_size'] == 50257  # GPT-2's tokenizer; the padding cropped


def test_weights_refuse_what_they_cannot_be(tmp_path, weights):
    out = str(tmp_path / 'run')
    msg = error_line(out, f'--init_from={weights}', '--block_size=64')
    assert 'block_size=64' in msg and 'the 48 positions' in msg
    msg = error_line(out, f'--init_from={weights}', '--model=bert', '--block_size=32')
    assert 'model=bert' in msg and '--model=gpt' in msg
    msg = error_line(out, f'--init_from={weights}', '--n_layer=3', '--block_size=32')  # was silently 2
    assert msg.startswith('error: n_layer=3 is not the shape of init_from=') and '(n_layer=2)' in msg


def test_compact_bins_with_gpt2_weights_say_to_prepare_gpt2_bins(tmp_path, weights):
    """GPT-2 weights take GPT-2's tokenizer whatever --tokenizer says: bins of another tokenizer must be
    prepared again with --tokenizer=gpt2 (tokenizer=auto would not help)."""
    src = tmp_path / 'text.txt'
    src.write_text(data.SyntheticCorpus().text(200, seed=0))
    bins = str(tmp_path / 'bins')
    data.prepare(str(src), bins, tokenizer='gpt2-compact', val_fraction=0.2)
    msg = error_line(str(tmp_path / 'run'), f'--init_from={weights}', f'--data={bins}', '--block_size=32')
    assert 'holds gpt2-compact tokens, not gpt2' in msg and '--tokenizer=gpt2 (GPT-2 weights' in msg
    assert not msg.split(': ', 2)[2].startswith('use tokenizer=auto')

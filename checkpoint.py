"""
Checkpoints and foreign weights, kept out of train.py: what a run saves so that a resumed run
continues as the unbroken one (save_checkpoint, restore_checkpoint), reading a checkpoint file
(load_checkpoint: torch or safetensors), GPT-2's released weights (load_gpt2) and building the
model from any of them (build_model). Every failure a user can cause is one line.
"""
import copy
import os
from dataclasses import asdict

import torch

import distributed
from data import check_data, load_run_data
from model import GPT, GPTConfig
from runfolder import checkpoint_path, writing

# what save_checkpoint writes and a resumed run reads
CKPT_KEYS = ('model', 'optimizer', 'config', 'model_args', 'tokenizer', 'iter_num', 'ranks', 'psu',
             'baara', 'diagnostics', 'latest')


def resumed_config(config, given, defaults, shape_keys):
    """--init_from=resume: the config of the checkpoint in out_dir under the keys given now (keys newer
    than the checkpoint: defaults). A shape key (its model's shape, data or vocabulary) may only
    repeat the checkpoint's value."""
    out_dir, path = config['out_dir'], os.path.join(config['out_dir'], 'ckpt.pt')
    if not os.path.exists(path) and os.path.exists(os.path.join(out_dir, 'log.jsonl')):
        raise SystemExit(f"error: nothing to resume: {path!r} does not exist (the run in {out_dir!r} stopped "
                         f"before its first checkpoint); start it again with --overwrite=True")
    ckpt = load_checkpoint(path)
    missing = [key for key in CKPT_KEYS if not isinstance(ckpt, dict) or key not in ckpt]
    if missing or not isinstance(ckpt['config'], dict):
        raise SystemExit(f"error: {path!r} is not a checkpoint written by train.py (it has no {', '.join(missing or ['config'])})")
    saved = ckpt['config']
    for key in shape_keys:
        if key in given and key in saved and config[key] != saved[key]:
            raise SystemExit(f"error: {key}={config[key]!r} does not match the checkpoint in {out_dir!r} ({key}="
                             f"{saved[key]!r}): a resumed run keeps its model shape, data and tokenizer; drop --{key}, "
                             f"or start a new run in another --out_dir")
    config = {**defaults, **saved, **{k: config[k] for k in given}, 'out_dir': out_dir, 'init_from': 'resume',
              'overwrite': config['overwrite']}
    if config['max_iters'] < ckpt['iter_num']:  # the loop would never meet max_iters
        raise SystemExit(f"error: max_iters={config['max_iters']} is below the iteration of the checkpoint in "
                         f"{out_dir!r} ({ckpt['iter_num']}); resume with --max_iters={ckpt['iter_num']} or more")
    return config


def load_checkpoint(path):
    """torch.load, or for a .safetensors file (Hugging Face's weights) its dict of tensors, with
    one-line errors for a missing or unreadable file. safetensors is imported only for such a file."""
    if not os.path.isfile(path):
        why = 'is not a regular file' if os.path.exists(path) else 'does not exist'
        raise SystemExit(f"error: checkpoint {path!r} {why}")
    if path.endswith('.safetensors'):
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise SystemExit(f"error: {path!r} is a safetensors file: pip install safetensors")
        try:
            return load_file(path, device='cpu')
        except Exception as e:
            raise SystemExit(f"error: checkpoint {path!r} is corrupt or not a safetensors file "
                             f"({type(e).__name__})")
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


def load_trained(path, device):
    """A checkpoint of train.py, and its model on `device` (sample.py's)."""
    ckpt = load_checkpoint(path)
    if not isinstance(ckpt, dict) or not {'model_args', 'model', 'tokenizer'} <= set(ckpt):
        raise SystemExit(f"error: {path!r} is not a checkpoint written by train.py")
    model = GPT(GPTConfig(**ckpt['model_args']))
    load_model_state(model, ckpt['model'], path)
    return ckpt, model.to(device)


# -----------------------------------------------------------------------------
# GPT-2's weights (nanoGPT's or Hugging Face's layout)

CONV1D = ('attn.c_attn.weight', 'attn.c_proj.weight', 'mlp.c_fc.weight', 'mlp.c_proj.weight')


def load_gpt2(c):
    """init_from=PATH: GPT-2's weights -> their state dict; GPT-2's tokenizer and shape go into c
    (for a resume)."""
    path = c['init_from']
    if not os.path.exists(path):  # a typo of 'resume' too
        raise SystemExit(f"error: init_from={path!r} does not exist (init_from: scratch, resume or a "
                         f"file of GPT-2 weights)")
    weights = load_checkpoint(path)
    if isinstance(weights, dict) and {'model_args', 'config', 'tokenizer'} <= set(weights):
        raise SystemExit(f"error: init_from={path!r} is a checkpoint of train.py, not GPT-2 weights; to "
                         f"continue that run use --init_from=resume "
                         f"--out_dir={os.path.dirname(path) or '.'}")
    if c['tokenizer'] not in ('auto', 'gpt2'):
        raise SystemExit("error: GPT-2 weights need tokenizer=gpt2 (the full 50257-token vocabulary)")
    c['tokenizer'] = 'gpt2'
    args, state = load_gpt2_state_dict(weights)
    if args.vocab_size < 50257:
        raise SystemExit(f"error: init_from={path!r} has {args.vocab_size} token embeddings; GPT-2 "
                         f"weights have 50257 (or a padded 50304)")
    if c['block_size'] > args.block_size:
        raise SystemExit(f"error: block_size={c['block_size']} is more than the {args.block_size} "
                         f"positions of init_from={path!r}; use --block_size={args.block_size} or less")
    for key in ('n_layer', 'n_head', 'n_embd', 'bias'):
        if c[key] not in (None, getattr(args, key)):  # given (get_config left the others None)
            raise SystemExit(f"error: {key}={c[key]!r} is not the shape of init_from={path!r} ({key}="
                             f"{getattr(args, key)!r}); leave it out, the weights set it")
        c[key] = getattr(args, key)
    return state


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
    sd = {(k if k.startswith(('transformer.', 'lm_head.')) else 'transformer.' + k): v
          for k, v in sd.items() if not k.endswith(('.attn.bias', '.attn.masked_bias'))}
    wte, wpe = sd.get('transformer.wte.weight'), sd.get('transformer.wpe.weight')
    if (not all(isinstance(v, torch.Tensor) for v in sd.values()) or wte is None or wpe is None
            or wte.dim() != 2 or wpe.dim() != 2 or not wte.size(1) or wte.size(1) % 64
            or 'transformer.h.0.attn.c_attn.weight' not in sd):
        raise SystemExit("error: init_from file is not GPT-2 weights: it needs tensors wte (vocabulary "
                         "x n_embd, n_embd a multiple of 64: n_head = n_embd // 64), wpe (positions x "
                         "n_embd) and h.0.attn.c_attn at least")
    n_embd = wte.size(1)
    if sd['transformer.h.0.attn.c_attn.weight'].shape == (n_embd, 3 * n_embd):  # Hugging Face's
        sd = {k: (v.t().contiguous() if k.endswith(CONV1D) else v) for k, v in sd.items()}
    sd.setdefault('lm_head.weight', wte)
    n_layer = 1 + max(int(k.split('.')[2]) for k in sd
                      if k.startswith('transformer.h.') and k.split('.')[2].isdigit())
    config = GPTConfig(n_layer=n_layer, n_head=n_embd // 64, n_embd=n_embd, vocab_size=wte.size(0),
                       block_size=wpe.size(0), bias='transformer.ln_f.bias' in sd)
    return config, sd


def load_run(c, world, rank):
    """train.py's data and model: from scratch, from GPT-2's weights, or resumed from the
    checkpoint in out_dir (returned too, for restore_checkpoint; else None). The model's shape,
    DMU and DTU come from the keys; BERT has one id more than its tokenizer, [MASK]."""
    ckpt = load_checkpoint(checkpoint_path(c)) if c['init_from'] == 'resume' else None
    gpt2_weights = load_gpt2(c) if c['init_from'] not in ('scratch', 'resume') else None
    data = load_run_data(c)
    check_data(data.train, data.val, data.tok, ckpt, c)
    if ckpt is not None and len(ckpt['ranks']) != world:  # each rank's RNGs and PSU reference
        raise SystemExit(f"error: the checkpoint in {c['out_dir']!r} was saved by "
                         f"{len(ckpt['ranks'])} process(es); resume it with as many (this run has "
                         f"{world})")
    keys = ('n_layer', 'n_head', 'n_embd', 'block_size', 'bias', 'dropout', 'dmu_p', 'dmu_mode',
            'dtu_r')
    config = GPTConfig(vocab_size=data.tok.vocab_size + (c['model'] == 'bert'),
                       causal=c['model'] == 'gpt', **{k: c[k] for k in keys})
    state, source = gpt2_weights, c['init_from']
    if ckpt is not None:
        state, source = ckpt['model'], checkpoint_path(c)
    model = build_model(config, state, source, c, world, rank)  # state None: initialised afresh
    if rank == 0:
        describe(model, data, world, c)
    return data, model, ckpt


def describe(model, data, world, c):
    """The run in two lines: the model, its data and its processes; the synthetic corpus's truth."""
    print(f"{c['model']}: {model.get_num_params() / 1e6:.2f}M parameters, vocab "
          f"{model.config.vocab_size} ({data.tok.name}), {len(data.train):,} train / "
          f"{len(data.val):,} val tokens, {world} process(es) on {c['device']}")
    if data.corpus is not None and data.tok.name == 'word':
        print(f"synthetic corpus: {len(data.corpus.templates)} modes, true entropy rate "
              f"{data.corpus.entropy_rate():.4f} nats/token")


def build_model(config, state, source, c, world, rank):
    """The model on its device, loaded from `state` (read from the file `source`) or freshly
    initialised when state is None. Under FSDP it is built sharded: no rank holds the whole model."""
    if state is not None:  # GPT-2's tables cropped: positions to block_size, tokens to the tokenizer's
        rows = {'transformer.wpe.weight': config.block_size, 'transformer.wte.weight': config.vocab_size,
                'lm_head.weight': config.vocab_size}  # (nanoGPT pads GPT-2's 50257 to 50304)
        state = {k: v[:rows[k]] if k in rows else v for k, v in state.items()}
    if not c['fsdp']:
        model = GPT(config)
        if state is not None:
            load_model_state(model, state, source)
        return model.to(c['device'])
    return distributed.build_fsdp(config, c['device'], world, c['dtype'], state, c['seed'] + rank)


# -----------------------------------------------------------------------------
# train.py's checkpoints: all that the next steps read, so that a resumed run continues as the
# unbroken one

def fresh_latest():
    """What the next Def. 3.1 record reads: the last 50 logged losses, the latest ||g|| and logged
    update norm; and the last eval's log row, for the report."""
    return dict(losses=[], grad_norm=torch.zeros(()), update_norm=torch.zeros(()), eval=None)


def rng_states(data_gen, device):
    cuda = torch.cuda.get_rng_state(device) if device.startswith('cuda') else None  # DMU/DTU on a GPU
    return dict(data=data_gen.get_state(), torch=torch.get_rng_state(), cuda=cuda)


def save_checkpoint(path, model, optimizer, psu, baara, diagnostics, data_gen, iter_num, latest, tok, c):
    """Every rank calls it: each rank's RNGs and PSU reference are gathered (each rank draws its own
    batches), and under FSDP the shards; rank 0 writes one file, atomically."""
    master = distributed.is_rank0()
    psu_saved = psu_state(psu, saving=master)  # collectives under FSDP
    baara_saved = baara_state(baara, saving=master) if baara else None
    ranks = distributed.gather_objects(dict(rng=rng_states(data_gen, c['device']),
                                            psu={k: psu_saved[k] for k in ('ref', 'var', 'fed_back')}))
    model_state, optim_state = distributed.whole_state_dicts(model, optimizer)
    if not master:
        return
    ckpt = dict(model=model_state, optimizer=optim_state, config=c, model_args=asdict(model.config),
                tokenizer=tok.state(), iter_num=iter_num, ranks=ranks, psu={'ema': psu_saved['ema']},
                baara=baara_saved, diagnostics=diagnostics.state_dict(),
                latest=dict(losses=latest['losses'], grad_norm=float(latest['grad_norm']),
                            update_norm=float(latest['update_norm']), eval=latest['eval']))
    with writing(path, path + '.tmp'):  # a full disk: one line, the last checkpoint kept
        torch.save(ckpt, path + '.tmp')
        os.replace(path + '.tmp', path)  # atomic: a crash never leaves half a checkpoint


def restore_checkpoint(ckpt, model, optimizer, psu, baara, diagnostics, data_gen, device, rank):
    """save_checkpoint's mirror (the model's weights are loaded when it is built), in this order:
    AdamW's state, this rank's PSU reference and the parameter EMA, BAARA's policy, Def. 3.1's
    records, this rank's RNGs. -> (iter_num, latest)."""
    distributed.load_optimizer(model, optimizer, ckpt['optimizer'])  # unfused stays so
    mine = ckpt['ranks'][rank]
    load_psu_state(psu, {**ckpt['psu'], **mine['psu']})
    if baara and ckpt['baara'] is not None:  # BAARA switched on at resume starts afresh
        load_baara_state(baara, ckpt['baara'])
    diagnostics.load_state_dict(ckpt['diagnostics'])
    data_gen.set_state(mine['rng']['data'])
    torch.set_rng_state(mine['rng']['torch'])
    if mine['rng']['cuda'] is not None and device.startswith('cuda'):
        torch.cuda.set_rng_state(mine['rng']['cuda'], device)
    return ckpt['iter_num'], {'eval': None, **ckpt['latest'], 'losses': list(ckpt['latest']['losses'])}


# -----------------------------------------------------------------------------
# PSU's and BAARA's state (stabilize.py, baara.py): all that their next steps read

def psu_state(psu, saving=True):
    """On the CPU: 'ref', 'var', this rank's r_t, scale_t^2 (each rank sees its own batches);
    'ema', theta_bar whole (under FSDP a collective: see distributed.gather_to_cpu); 'fed_back',
    this rank's stream of the data channel, its count and its generator."""
    ref, var = (None if t is None else t.cpu() for t in (psu.ref, psu.var))
    ema = None if psu.ema is None else distributed.gather_to_cpu(psu.ema, saving)
    fed = psu.fed_back
    fed_back = dict(stream=fed.stream, generated=fed.generated, gen=fed.gen.get_state()) if fed else None
    return {'ref': ref, 'var': var, 'ema': ema, 'fed_back': fed_back}


def load_psu_state(psu, state):
    """psu_state's mirror; a state that does not fit this code stops with a one-line error."""
    ref, var, names = state['ref'], state['var'], ', '.join(psu.names)
    if ref is not None and len(ref) != len(psu.names):
        raise SystemExit(f"error: the checkpoint's PSU reference holds {len(ref)} statistics, "
                         f"this code computes {len(psu.names)} ({names})")
    ema = state['ema'] if psu.params_on else None  # loaded only when the channel is on
    if ema is not None and len(ema) != len(psu.params):
        raise SystemExit(f"error: the checkpoint's PSU parameter EMA holds {len(ema)} tensors, "
                         f"this code's PSU has {len(psu.params)} parameters")
    for i, (e, p) in enumerate(zip(ema or [], psu.params)):
        if e.shape != p.shape:
            raise SystemExit(f"error: the checkpoint's PSU parameter EMA {i} has shape "
                             f"{tuple(e.shape)}, this code's parameter {i} {tuple(p.shape)}")
    device = psu.params[0].device
    psu.ref, psu.var = (None if t is None else t.to(device, copy=True) for t in (ref, var))
    for e, s in zip(psu.ema if ema is not None else [], ema or []):
        distributed.copy_full_(e, s)
    fed = state.get('fed_back')
    if psu.fed_back and fed:  # (none before the data channel's loop started)
        psu.fed_back.stream, psu.fed_back.generated = fed['stream'], fed['generated']
        psu.fed_back.gen.set_state(fed['gen'])


BAARA_SAVED = ('heads', 'norm', 'baseline', 'loss_avg', 'step', 'step_time', 'values', 'value',
               'keep_now', 'decisions', 'last')


def baara_state(baara, saving=True):
    """BAARA_SAVED as they are, g_ref whole (one tensor per parameter), the generators. Under FSDP
    a collective: every rank calls it; ranks that do not save pass saving=False."""
    parts = zip(baara.g_ref.split(baara.numels), baara.params)
    g_ref = [g.cpu() if saving else None for g in (distributed.whole(t, p) for t, p in parts)]
    return {**{name: getattr(baara, name) for name in BAARA_SAVED}, 'g_ref': g_ref,
            'policy_gen': baara.policy_gen.get_state(), 'ref_gen': baara.ref_gen.get_state()}


def load_baara_state(baara, state):
    s = copy.deepcopy(dict(state))  # a checkpoint may be memory-mapped
    for name in BAARA_SAVED:
        setattr(baara, name, s[name])
    baara.value = baara.value.to(baara.params[0].device)
    g_ref = zip(s['g_ref'], baara.params)
    baara.g_ref = distributed.flat([distributed.copy_full_(torch.zeros_like(p), g) for g, p in g_ref])
    baara.policy_gen.set_state(s['policy_gen'])
    baara.ref_gen.set_state(s['ref_gen'])
    baara.model.set_keep_ratios(*baara.keeps[baara.keep_now])

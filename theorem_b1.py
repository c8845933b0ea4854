"""
Theorem B.1 on a toy: `python theorem_b1.py` (no arguments; about 3 minutes on 2 CPU cores).

A tiny GPT trains with BAARA (baara.py) on the synthetic corpus; each batch is noisy (uniformly
random targets) with probability 1/3. The theorem says the policy learns to give noisy batches a
smaller step alpha_b. It prints, at three seeds, the policy's mean expected alpha on clean and on
noisy batches over the second half of 300 steps, for BAARA and for a control whose policy sees a
zeroed state (it cannot tell the batches apart, so it shows no gap).
"""
import sys

from configurator import exit_if_help

if __name__ == '__main__' and sys.argv[1:]:  # --help answers before torch is imported
    exit_if_help(sys.argv[1:], __doc__)
    raise SystemExit(f"error: theorem_b1.py takes no arguments; got {' '.join(sys.argv[1:])!r} "
                     f"(--help: what it runs)")

import numpy as np
import torch

from baara import BAARA
from data import get_batch, load_data
from model import GPT, GPTConfig
from train import train_step


def theorem_b1(seed, steps=300, noise=1 / 3, blind=False):
    """The policy's mean expected alpha on clean and on noisy batches over the second half of
    `steps`; blind=True: the policy sees a zeroed state (the control)."""
    torch.manual_seed(seed)
    ids, _, tok, _, _ = load_data('synthetic', 'word', n_sentences=20_000)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=tok.vocab_size))
    optimizer = model.configure_optimizers(0.1, 3e-3, (0.9, 0.99), 'cpu')
    gen, batch = torch.Generator().manual_seed(seed), lambda g: get_batch(ids, 16, 16, g, 'cpu')
    baara, alphas = BAARA(model, np.bincount(ids), seed, batch, cost='flops'), {False: [], True: []}
    if blind:
        baara.norm.normalize = torch.zeros_like
    for step in range(steps):
        x, y = batch(gen)
        noisy = torch.rand((), generator=gen).item() < noise
        y = torch.randint(tok.vocab_size, y.shape, generator=gen) if noisy else y
        train_step(model, optimizer, lambda: (x, y), 3e-3, baara=baara, grad_clip=1.0)
        if step >= steps // 2:
            alphas[noisy].append(baara.last['expected_alpha'])
    return sum(alphas[False]) / len(alphas[False]), sum(alphas[True]) / len(alphas[True])


if __name__ == '__main__':
    torch.set_num_threads(1)
    print('| seed | policy | mean alpha, clean | mean alpha, noisy | gap |\n|---|---|---|---|---|')
    for seed in (2025, 2026, 2027):
        for blind in (False, True):
            clean, noisy = theorem_b1(seed, blind=blind)
            gap = clean - noisy
            policy = 'state zeroed' if blind else 'BAARA'
            print(f"| {seed} | {policy} | {clean:.3f} | {noisy:.3f} | {gap:+.3f} |")

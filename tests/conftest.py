"""Shared test setup: import the flat scripts from the repository root, and keep torch to one
thread (the tests use tiny models; more threads only fight over a small shared machine)."""
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

torch.set_num_threads(1)

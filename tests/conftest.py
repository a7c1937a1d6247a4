"""Test-session settings shared by every test module."""

import torch

# The tests use tiny models: one intra-op thread is faster for them than two, and immune to
# oversubscription when other work shares the cores. Benchmarks set their own thread counts.
torch.set_num_threads(1)

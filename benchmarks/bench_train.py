"""Epochs and seconds until the default mlp fits mnist5k (flatcli.train defaults).

Issue: `flatcli train --model mlp --dataset mnist5k` reaches 100 % training accuracy in well
under a minute on a 2-core CPU. Run: PYTHONPATH=. python benchmarks/bench_train.py [--quick]
"""

import argparse
import time

import torch

import model_zoo
from flatcli.data import load_dataset
from flatcli.train import TrainConfig, fit, prepare_train_split

p = argparse.ArgumentParser()
p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4, 5])
p.add_argument("--threads", type=int, default=1)
p.add_argument("--quick", action="store_true", help="seed 0 only")
args = p.parse_args()
torch.set_num_threads(args.threads)
data = load_dataset("mnist5k")
for seed in [0] if args.quick else args.seeds:
    config = TrainConfig(seed=seed, target_train_acc=1.0)  # SGD, momentum 0.9, lr 0.05, batch 64
    torch.manual_seed(seed)
    model = model_zoo.get_model("mlp", num_classes=10, in_channels=1)
    train, _ = prepare_train_split(data.train, data.num_classes, config)
    wall, cpu = time.perf_counter(), time.process_time()
    r = fit(model, train, data.test, data.num_classes, config)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    print(
        f"seed {seed}: 100% train acc: {r.reached_target} after {r.epochs} epochs, "
        f"{wall:.2f} s wall, {cpu:.2f} s CPU ({cpu / r.epochs:.3f} s/epoch), "
        f"test acc {r.test_acc:.4f}"
    )

#!/usr/bin/env python3
"""Run the main job's CNN runs in PyTorch, the same way, and time them.

The same net (Conv2d(1,16,3,padding=1) -> [BatchNorm2d(16)] -> ReLU -> Conv2d(16,32,3,padding=1)
-> [BatchNorm2d(32)] -> ReLU -> MaxPool2d(2) -> Flatten -> Linear(512,10)), float32, SGD with
momentum 0.9, the same batch size, steps, learning rates and their schedule (by default a
linear warm-up then cosine annealing, PyTorch's LinearLR then CosineAnnealingLR), gradient
clipping (`clip_grad_norm_`), evaluation schedule (test accuracy
in eval mode at step 0, every `--eval-every` steps and after the last) on the digits split
80/20 and standardised per pixel on the training split, as `cargo run --release --example
train -- --model cnn` does. The split and the batch order come from NumPy's generator, not
Rust's, so accuracies differ a little; the work per run is the same.

Prints one JSON line per run and a table:

    {"model": "cnn", "batchnorm": true, "learning_rate": 0.05, "steps": 1500, "seconds": ...,
     "final_test_accuracy": ..., "torch": "2.13.0", "threads": 2}

Compare with `out/summary.json` of the Rust job (`--ours out/summary.json` prints ours /
PyTorch per run). Needs `torch` and `numpy` (CPU is enough).
"""

import argparse
import gzip
import json
import pathlib
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent


def load_digits(path):
    import numpy as np

    with gzip.open(path, "rt") as f:
        rows = np.array([[int(v) for v in line.split(",")] for line in f if line.strip()])
    return rows[:, :64].astype(np.float64), rows[:, 64].astype(np.int64)


def cnn(torch, batchnorm):
    nn = torch.nn
    layers = []
    for c_in, c_out in [(1, 16), (16, 32)]:
        layers.append(nn.Conv2d(c_in, c_out, 3, padding=1))
        if batchnorm:
            layers.append(nn.BatchNorm2d(c_out))
        layers.append(nn.ReLU())
    layers += [nn.MaxPool2d(2), nn.Flatten(), nn.Linear(512, 10)]
    return nn.Sequential(*layers)


def learning_rate(lr, t, args):
    """The rate of step t (from 0): the formulas of src/train.rs's schedules."""
    import math

    if args.schedule == "constant":
        return lr
    warmup = min(max(args.warmup, 1), args.steps)
    if t < warmup:
        return lr * (0.1 + 0.9 * t / warmup)
    rest = max(args.steps - warmup, 1)
    return 0.5 * lr * (1 + math.cos(math.pi * min(t - warmup, rest) / rest))


def run(torch, np, data, batchnorm, lr, args):
    train_x, train_y, test_x, test_y = data
    torch.manual_seed(args.seed)
    net = cnn(torch, batchnorm)
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
    rng = np.random.default_rng(args.seed + 1)
    order, cursor = np.arange(len(train_x)), len(train_x)

    def evaluate():
        net.eval()
        with torch.no_grad():
            accuracy = (net(test_x).argmax(1) == test_y).float().mean().item()
        net.train()
        return accuracy

    start = time.perf_counter()
    accuracy, diverged = evaluate(), None
    for step in range(1, args.steps + 1):
        if cursor + args.batch_size > len(order):
            rng.shuffle(order)
            cursor = 0
        batch = torch.from_numpy(order[cursor : cursor + args.batch_size])
        cursor += args.batch_size
        loss = torch.nn.functional.cross_entropy(net(train_x[batch]), train_y[batch])
        if not torch.isfinite(loss):
            diverged = step
            break
        opt.zero_grad()
        loss.backward()
        if args.clip_norm:
            torch.nn.utils.clip_grad_norm_(net.parameters(), args.clip_norm)
        for group in opt.param_groups:
            group["lr"] = learning_rate(lr, step - 1, args)
        opt.step()
        if step % args.eval_every == 0 or step == args.steps:
            accuracy = evaluate()
    return {
        "model": "cnn",
        "batchnorm": batchnorm,
        "learning_rate": lr,
        "steps": args.steps,
        "seconds": time.perf_counter() - start,
        "final_test_accuracy": accuracy,
        "diverged_at": diverged,
        "torch": torch.__version__.split("+")[0],
        "threads": torch.get_num_threads(),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--high-lr", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=60)
    parser.add_argument("--schedule", choices=["constant", "warmup-cosine"], default="warmup-cosine")
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--clip-norm", type=float, default=1.0, help="0: no clipping")
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data", default=str(ROOT / "crates" / "layers" / "data" / "digits.csv.gz"))
    parser.add_argument("--ours", help="the Rust job's summary.json, for ours / PyTorch")
    args = parser.parse_args()

    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    x, y = load_digits(args.data)
    perm = np.random.default_rng(args.seed).permutation(len(x))
    n_test = round(0.2 * len(x))
    test, train = perm[:n_test], perm[n_test:]
    mean, std = x[train].mean(0), x[train].std(0)
    std[std == 0] = 1.0
    as_images = lambda rows: torch.from_numpy(((rows - mean) / std).astype(np.float32)).reshape(-1, 1, 8, 8)
    data = (as_images(x[train]), torch.from_numpy(y[train]), as_images(x[test]), torch.from_numpy(y[test]))

    ours = {}
    if args.ours:
        for r in json.loads(pathlib.Path(args.ours).read_text())["runs"]:
            if r.get("model") == "cnn":
                ours[(r["batchnorm"], r["learning_rate"])] = r["seconds"]
    results = []
    for lr in [args.lr, args.high_lr]:
        for batchnorm in [False, True]:
            result = run(torch, np, data, batchnorm, lr, args)
            print(json.dumps(result), flush=True)
            results.append(result)
    print()
    print("| run | learning rate | PyTorch accuracy | PyTorch s | ours s | ours / PyTorch |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for r in results:
        mine = ours.get((r["batchnorm"], r["learning_rate"]))
        ratio = f"{mine / r['seconds']:.2f}" if mine else "-"
        print(
            f"| {'with' if r['batchnorm'] else 'without'} BatchNorm | {r['learning_rate']} "
            f"| {100 * r['final_test_accuracy']:.1f}% | {r['seconds']:.2f} "
            f"| {f'{mine:.2f}' if mine else '-'} | {ratio} |"
        )


if __name__ == "__main__":
    main()

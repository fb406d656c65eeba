#!/usr/bin/env python3
"""A Hessian-vector product beside a gradient, in PyTorch and in ours, on the same cases as
`cargo run --release --example bench -- --op hvp`: BatchNorm in training mode on the BatchNorm
grid, and the main job's MLP with BatchNorm (64 -> (Linear -> BatchNorm1d -> Sigmoid) x 3 ->
Linear -> 10, a batch of 60) under softmax cross-entropy.

A gradient pass is forward + `torch.autograd.grad` of every input (BatchNorm: x, weight, bias;
the MLP: every parameter). An HVP pass is forward, `autograd.grad(..., create_graph=True)`,
`S = sum(<gradient, v>)` and `autograd.grad(S, inputs)`: what ours times.

    cargo build --release --example bench
    python3 benches/pytorch_hvp.py --bench target/release/examples/bench [--quick] [--rounds 3]

runs both, case by case in alternation, and prints a table of the HVP / gradient ratio of each
(medians of the rounds). Without `--bench` it prints PyTorch's JSON lines only. Needs `torch`.
"""

import argparse
import json
import statistics
import subprocess
import sys
import time

GRID = [(8, 4), (64, 64), (256, 1024), (1024, 64), (4096, 4096), (65536, 256), (32, 64, 56, 56)]
QUICK = [(8, 4), (64, 64), (256, 1024), (4096, 4096)]
MLP = "mlp_bn[60,64]"


def median_us(run, min_runs, min_seconds):
    run()
    times, start = [], time.perf_counter()
    while len(times) < min_runs or time.perf_counter() - start < min_seconds:
        t = time.perf_counter()
        run()
        times.append((time.perf_counter() - t) * 1e6)
    return statistics.median(times)


def passes(torch, case):
    """(gradient pass, HVP pass) for a case name."""
    torch.manual_seed(0)
    F = torch.nn.functional
    if case == MLP:
        layers = []
        width = 64
        for _ in range(3):
            layers += [torch.nn.Linear(width, 100), torch.nn.BatchNorm1d(100), torch.nn.Sigmoid()]
            width = 100
        net = torch.nn.Sequential(*layers, torch.nn.Linear(width, 10))
        x = 1.0 + 2.0 * torch.randn(60, 64)
        labels = torch.arange(60) % 10
        inputs = list(net.parameters())

        def loss():
            return F.cross_entropy(net(x), labels)
    else:
        shape = tuple(int(d) for d in case[len("batch_norm["):-1].split(","))
        x = (1.0 + 2.0 * torch.randn(shape)).requires_grad_()
        weight = torch.ones(shape[1], requires_grad=True)
        bias = torch.zeros(shape[1], requires_grad=True)
        dout = 1.0 + 2.0 * torch.randn(shape)
        inputs = [x, weight, bias]

        def loss():
            return (F.batch_norm(x, None, None, weight, bias, True, 0.1, 1e-5) * dout).sum()
    v = [torch.randn_like(p) for p in inputs]

    def gradient():
        return torch.autograd.grad(loss(), inputs)

    def hvp():
        grads = torch.autograd.grad(loss(), inputs, create_graph=True)
        s = sum((g * d).sum() for g, d in zip(grads, v))
        return torch.autograd.grad(s, inputs, allow_unused=True)

    return gradient, hvp


def torch_line(torch, case, quick):
    gradient, hvp = passes(torch, case)
    budget = (3, 0.2) if quick else (11, 1.0)
    g, h = median_us(gradient, *budget), median_us(hvp, *budget)
    return {"op": "hvp", "case": case, "gradient_us": round(g, 1), "hvp_us": round(h, 1),
            "ratio": round(h / g, 3), "torch": torch.__version__, "threads": torch.get_num_threads()}


def run_bench(binary, case, quick):
    command = [binary, "--op", "hvp", "--dtype", "f32"]
    if case != MLP:
        command += ["--shape", case[len("batch_norm["):-1].replace(",", "x")]
    if quick:
        command.append("--quick")
    lines = subprocess.run(command, check=True, capture_output=True, text=True).stdout.strip().splitlines()
    return next(json.loads(line) for line in lines if json.loads(line)["case"] == case)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the quick grid, fewer repetitions")
    parser.add_argument("--bench", help="the Rust benchmark binary: run it case by case, alternating")
    parser.add_argument("--rounds", type=int, default=3, help="with --bench: rounds per case (default 3)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    args = parser.parse_args()
    try:
        import torch
    except ImportError:
        sys.exit("benches/pytorch_hvp.py needs torch: pip install torch")
    if args.rounds < 1:
        sys.exit(f"--rounds must be at least 1, got {args.rounds}")
    torch.set_num_threads(args.threads)
    cases = ["batch_norm[" + ",".join(map(str, s)) + "]" for s in (QUICK if args.quick else GRID)] + [MLP]
    rows = []
    for case in cases:
        ours, theirs = [], []
        for _ in range(args.rounds if args.bench else 1):
            if args.bench:
                ours.append(run_bench(args.bench, case, args.quick))
            theirs.append(torch_line(torch, case, args.quick))
        if not args.bench:
            print(json.dumps(theirs[0]), flush=True)
            continue
        med = lambda lines, k: statistics.median(line[k] for line in lines)  # noqa: E731
        row = (case, med(ours, "gradient_us"), med(ours, "hvp_us"), med(ours, "ratio"),
               med(theirs, "gradient_us"), med(theirs, "hvp_us"), med(theirs, "ratio"),
               ours[0]["gradient_saved_bytes"], ours[0]["hvp_saved_bytes"])
        print(f"{case}: ours ratio {[o['ratio'] for o in ours]}, PyTorch {[t['ratio'] for t in theirs]}",
              file=sys.stderr, flush=True)
        rows.append(row)
    if rows:
        print(f"f32, medians of {args.rounds} alternating rounds; PyTorch {torch.__version__}, "
              f"{torch.get_num_threads()} threads")
        print("| case | ours gradient (us) | ours HVP (us) | ours HVP / gradient | PyTorch gradient (us) "
              "| PyTorch HVP (us) | PyTorch HVP / gradient | ours saved bytes, gradient / HVP |")
        print("|---|---:|---:|---:|---:|---:|---:|---|")
        for r in rows:
            print(f"| {r[0]} | {r[1]:.1f} | {r[2]:.1f} | {r[3]:.2f} | {r[4]:.1f} | {r[5]:.1f} | {r[6]:.2f} "
                  f"| {r[7]} / {r[8]} |")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Time PyTorch's own CPU BatchNorm kernels on the grid of `cargo run --release --example bench`.

Times `torch.ops.aten.native_batch_norm` (training mode) followed by
`torch.ops.aten.native_batch_norm_backward` (all three gradients), the pair PyTorch's autograd
runs for `F.batch_norm`, and prints one JSON line per case:

    {"dtype": "f32", "shape": [4096, 4096], "torch_us": <median fwd+bwd>, "torch": "2.13.0", "threads": 2}

Given the Rust benchmark's output (`--ours FILE`, or `-` for stdin), it prints instead a table
of ours / PyTorch per case:

    cargo run --release --example bench > ours.jsonl
    python3 benches/pytorch_reference.py --ours ours.jsonl

Or, more robust on a shared machine whose speed drifts from minute to minute, let it run the
Rust benchmark itself, case by case in alternation with PyTorch's, several rounds, and compare
the medians of the rounds (`--save-ours` keeps the merged Rust lines):

    cargo build --release --example bench
    python3 benches/pytorch_reference.py --bench target/release/examples/bench --rounds 3

`--baseline OTHER_BINARY` runs a second build of the Rust benchmark in the same rounds (the
code before a change), for ours / baseline measured side by side.

Needs `torch` (CPU is enough). Runs on as many threads as the Rust side (2 by default).
"""

import argparse
import json
import statistics
import subprocess
import sys
import time

GRID = [(8, 4), (64, 64), (256, 1024), (1024, 64), (4096, 4096), (65536, 256), (32, 64, 56, 56)]
QUICK = [(8, 4), (64, 64), (256, 1024), (4096, 4096)]


def parse_shape(text):
    try:
        shape = tuple(int(d) for d in text.replace(",", "x").split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a shape like 4096x4096")
    if not 2 <= len(shape) <= 5:
        raise argparse.ArgumentTypeError(f"{text!r} has rank {len(shape)}, expected 2 to 5")
    return shape


def time_case(torch, shape, dtype, min_runs, min_seconds):
    """Median wall time in microseconds of one forward + backward."""
    torch.manual_seed(0)
    x = 1.0 + 2.0 * torch.randn(shape, dtype=dtype)
    grad = 1.0 + 2.0 * torch.randn(shape, dtype=dtype)
    weight = torch.ones(shape[1], dtype=dtype)
    bias = torch.zeros(shape[1], dtype=dtype)
    aten = torch.ops.aten

    def run():
        out, save_mean, save_invstd = aten.native_batch_norm(x, weight, bias, None, None, True, 0.1, 1e-5)
        grads = aten.native_batch_norm_backward(
            grad, x, weight, None, None, save_mean, save_invstd, True, 1e-5, [True, True, True]
        )
        return out, grads

    run()  # warm-up
    times = []
    start = time.perf_counter()
    while len(times) < min_runs or (time.perf_counter() - start < min_seconds and len(times) < 10_000):
        t = time.perf_counter()
        result = run()
        del result  # free the outputs inside the timed region, as the Rust side does
        times.append((time.perf_counter() - t) * 1e6)
    return statistics.median(times)


def budget(args):
    return (3, 0.2) if args.quick else (11, 1.0)


def torch_line(torch, name, shape, args):
    dtype = {"f32": torch.float32, "f64": torch.float64}[name]
    us = time_case(torch, shape, dtype, *budget(args))
    return {"dtype": name, "shape": list(shape), "torch_us": round(us, 1),
            "torch": torch.__version__, "threads": torch.get_num_threads()}


def cases(args):
    """The (dtype name, shape) pairs the arguments select, in the Rust benchmark's order."""
    shapes = args.shape or (QUICK if args.quick else GRID)
    dtypes = [args.dtype] if args.dtype else ["f32", "f64"]
    return [(name, shape) for name in dtypes for shape in shapes]


def measure(args):
    import torch

    torch.set_num_threads(args.threads)
    for name, shape in cases(args):
        line = torch_line(torch, name, shape, args)
        print(json.dumps(line), flush=True)
        yield line


def table(ours, theirs, baseline=None):
    """Markdown table of ours / PyTorch per case; with `baseline` (lines of another build of the
    Rust benchmark, by case), its time and ours / baseline too."""
    extra = " baseline (us) | ours / baseline |" if baseline else ""
    print()
    print("| dtype | shape | ours (us) | PyTorch (us) | ours / PyTorch | composed / fused "
          "| fused / traffic bound |" + extra)
    print("|---|---|---:|---:|---:|---:|---:|" + ("---:|---:|" if baseline else ""))
    for o in ours:
        key = (o["dtype"], tuple(o["shape"]))
        if key not in theirs:
            continue
        ratio = o["fused_us"] / theirs[key]["torch_us"]
        composed = f"{o['composed_us'] / o['fused_us']:.1f}x" if o["composed_us"] else "-"
        bound = o["fused_us"] / o["traffic_bound_us"] if o["traffic_bound_us"] > 0 else float("nan")
        row = (f"| {o['dtype']} | {'x'.join(map(str, o['shape']))} | {o['fused_us']:.1f} "
               f"| {theirs[key]['torch_us']:.1f} | {ratio:.3f} | {composed} | {bound:.2f} |")
        if baseline:
            b = baseline[key]["fused_us"]
            row += f" {b:.1f} | {o['fused_us'] / b:.3f} |"
        print(row)


def compare(args):
    source = sys.stdin if args.ours == "-" else open(args.ours)
    ours = [json.loads(line) for line in source if line.strip().startswith("{")]
    args.shape = args.shape or [tuple(o["shape"]) for o in ours if o["dtype"] == ours[0]["dtype"]]
    theirs = {(t["dtype"], tuple(t["shape"])): t for t in measure(args)}
    table(ours, theirs)


def median_of(lines, key):
    values = [line[key] for line in lines]
    return None if None in values else statistics.median(values)


def run_bench(binary, name, shape, args):
    """One run of a Rust benchmark binary on one case: its JSON line."""
    command = [binary, "--dtype", name, "--shape", "x".join(map(str, shape))]
    if args.quick:
        command.append("--quick")
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def merged(rounds):
    """The first round's line with the medians of the rounds' timings."""
    line = dict(rounds[0])
    for key, digits in (("fused_us", 1), ("composed_us", 1), ("copy_gbps", 2), ("traffic_bound_us", 3)):
        value = median_of(rounds, key)
        line[key] = None if value is None else round(value, digits)
    return line


def interleave(args):
    """Each case: the Rust benchmark's run (and the baseline build's) and PyTorch's in turn,
    `--rounds` times; medians."""
    import torch

    torch.set_num_threads(args.threads)
    ours, theirs, baseline = [], {}, {}
    for name, shape in cases(args):
        rust_rounds, torch_rounds, baseline_rounds = [], [], []
        for _ in range(args.rounds):
            if args.baseline:
                baseline_rounds.append(run_bench(args.baseline, name, shape, args))
            rust_rounds.append(run_bench(args.bench, name, shape, args))
            torch_rounds.append(torch_line(torch, name, shape, args))
        theirs_line = dict(torch_rounds[0], torch_us=round(median_of(torch_rounds, "torch_us"), 1))
        report = (f"{name} {'x'.join(map(str, shape))}: ours {[r['fused_us'] for r in rust_rounds]} us, "
                  f"PyTorch {[t['torch_us'] for t in torch_rounds]} us")
        if args.baseline:
            report += f", baseline {[r['fused_us'] for r in baseline_rounds]} us"
            baseline[(name, tuple(shape))] = merged(baseline_rounds)
        print(report, file=sys.stderr, flush=True)
        ours.append(merged(rust_rounds))
        theirs[(name, tuple(shape))] = theirs_line
    if args.save_ours:
        with open(args.save_ours, "w") as f:
            for line in ours:
                f.write(json.dumps(line) + "\n")
    print(f"medians of {args.rounds} alternating rounds per case; PyTorch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    table(ours, theirs, baseline or None)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a subset of the grid, fewer repetitions")
    parser.add_argument("--dtype", choices=["f32", "f64"], help="only this element type")
    parser.add_argument("--shape", type=parse_shape, action="append", help="only this shape, like 4096x4096 (repeatable)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--ours", help="the Rust benchmark's JSON lines (a file, or - for stdin): print ratios")
    parser.add_argument("--bench", help="the Rust benchmark binary: run it case by case, alternating with PyTorch")
    parser.add_argument("--rounds", type=int, default=3, help="with --bench: rounds per case (default 3)")
    parser.add_argument("--save-ours", help="with --bench: write the merged Rust lines to this file")
    parser.add_argument("--baseline", help="with --bench: another build of the Rust benchmark (the code before "
                        "a change, say), run in the same rounds: adds its time and ours / baseline")
    args = parser.parse_args()
    try:
        import torch  # noqa: F401
    except ImportError:
        sys.exit("benches/pytorch_reference.py needs torch: pip install torch")
    if args.ours and args.bench:
        sys.exit("give --ours (a finished run) or --bench (run it here), not both")
    if args.baseline and not args.bench:
        sys.exit("--baseline goes with --bench")
    if args.rounds < 1:
        sys.exit(f"--rounds must be at least 1, got {args.rounds}")
    if args.bench:
        interleave(args)
    elif args.ours:
        compare(args)
    else:
        for _ in measure(args):
            pass


if __name__ == "__main__":
    main()

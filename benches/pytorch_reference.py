#!/usr/bin/env python3
"""Time PyTorch's own CPU kernels on the grid of `cargo run --release --example bench`.

For BatchNorm, `torch.ops.aten.native_batch_norm` (training mode) followed by
`torch.ops.aten.native_batch_norm_backward` (all three gradients), the pair PyTorch's autograd
runs for `F.batch_norm`. For conv2d (kernel 3x3, padding 1, with bias) and max_pool2d (2x2,
stride 2), `torch.nn.functional.conv2d` / `max_pool2d` forward and `torch.autograd.grad` of
every input, as a training step runs them; the same for `layer_norm` (over the last axis) and
`group_norm`, with weight and bias. One JSON line per case:

    {"op": "batch_norm", "dtype": "f32", "shape": [4096, 4096], "torch_us": <median fwd+bwd>, "torch": "2.13.0", "threads": 2}
    {"op": "conv2d", "dtype": "f32", "shape": [60, 16, 8, 8], "out_channels": 32, "torch_us": ..., ...}

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
# conv2d: (input shape, output channels), kernel 3x3, padding 1; the first QUICK_CONV with --quick.
CONV = [((64, 1, 8, 8), 16), ((60, 16, 8, 8), 32), ((32, 16, 28, 28), 32), ((8, 64, 56, 56), 64)]
QUICK_CONV = 2
# max_pool2d 2x2, stride 2: input shapes.
POOL = [(32, 32, 28, 28)]
# layer_norm over the last axis (a transformer block's activations); group_norm: (shape, groups).
LAYER_NORM = [(64 * 128, 768)]
GROUP_NORM = [((32, 64, 56, 56), 32)]
OPS = ["batch_norm", "conv2d", "max_pool2d", "layer_norm", "group_norm"]


def parse_shape(text):
    try:
        shape = tuple(int(d) for d in text.replace(",", "x").split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a shape like 4096x4096")
    if not 2 <= len(shape) <= 5:
        raise argparse.ArgumentTypeError(f"{text!r} has rank {len(shape)}, expected 2 to 5")
    return shape


def median_us(run, min_runs, min_seconds):
    """Median wall time in microseconds of `run()`, after one warm-up."""
    run()
    times = []
    start = time.perf_counter()
    while len(times) < min_runs or (time.perf_counter() - start < min_seconds and len(times) < 10_000):
        t = time.perf_counter()
        result = run()
        del result  # free the outputs inside the timed region, as the Rust side does
        times.append((time.perf_counter() - t) * 1e6)
    return statistics.median(times)


def batch_norm_pass(torch, case, dtype):
    shape = case["shape"]
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

    return run


def conv_pass(torch, case, dtype):
    n, c, h, w = case["shape"]
    co = case["out_channels"]
    torch.manual_seed(0)
    x = (1.0 + 2.0 * torch.randn(n, c, h, w, dtype=dtype)).requires_grad_()
    weight = (1.0 + 2.0 * torch.randn(co, c, 3, 3, dtype=dtype)).requires_grad_()
    bias = (1.0 + 2.0 * torch.randn(co, dtype=dtype)).requires_grad_()
    grad = 1.0 + 2.0 * torch.randn(n, co, h, w, dtype=dtype)

    def run():
        out = torch.nn.functional.conv2d(x, weight, bias, padding=1)
        return out, torch.autograd.grad(out, [x, weight, bias], grad)

    return run


def pool_pass(torch, case, dtype):
    n, c, h, w = case["shape"]
    torch.manual_seed(0)
    x = (1.0 + 2.0 * torch.randn(n, c, h, w, dtype=dtype)).requires_grad_()
    grad = 1.0 + 2.0 * torch.randn(n, c, h // 2, w // 2, dtype=dtype)

    def run():
        out = torch.nn.functional.max_pool2d(x, 2)
        return out, torch.autograd.grad(out, [x], grad)

    return run


def norm_pass(torch, case, dtype):
    shape = case["shape"]
    features = shape[-1] if case["op"] == "layer_norm" else shape[1]
    torch.manual_seed(0)
    x = (1.0 + 2.0 * torch.randn(shape, dtype=dtype)).requires_grad_()
    grad = 1.0 + 2.0 * torch.randn(shape, dtype=dtype)
    weight = (1.0 + 2.0 * torch.randn(features, dtype=dtype)).requires_grad_()
    bias = torch.zeros(features, dtype=dtype, requires_grad=True)
    F = torch.nn.functional

    def run():
        if case["op"] == "layer_norm":
            out = F.layer_norm(x, (features,), weight, bias, 1e-5)
        else:
            out = F.group_norm(x, case["groups"], weight, bias, 1e-5)
        return out, torch.autograd.grad(out, [x, weight, bias], grad)

    return run


PASSES = {"batch_norm": batch_norm_pass, "conv2d": conv_pass, "max_pool2d": pool_pass,
          "layer_norm": norm_pass, "group_norm": norm_pass}


def budget(args):
    return (3, 0.2) if args.quick else (11, 1.0)


def key(case):
    """What identifies a case in both programs' lines (lines without "op" are BatchNorm's)."""
    return (case.get("op", "batch_norm"), case["dtype"], tuple(case["shape"]))


def torch_line(torch, case, args):
    dtype = {"f32": torch.float32, "f64": torch.float64}[case["dtype"]]
    us = median_us(PASSES[case["op"]](torch, case, dtype), *budget(args))
    return dict(case, shape=list(case["shape"]), torch_us=round(us, 1),
                torch=torch.__version__, threads=torch.get_num_threads())


def cases(args):
    """The cases the arguments select, in the Rust benchmark's order: BatchNorm in f32 and f64
    (or --dtype), conv2d and max_pool2d in f32 (or --dtype); --shape picks BatchNorm's shapes and
    the conv-net cases with that input shape."""
    selected = []
    for op in args.op or OPS:
        dtypes = [args.dtype] if args.dtype else (["f32", "f64"] if op == "batch_norm" else ["f32"])
        if op == "batch_norm":
            grid = [(shape, None) for shape in (args.shape or (QUICK if args.quick else GRID))]
        elif op == "conv2d":
            grid = CONV[:QUICK_CONV] if args.quick else CONV
        elif op == "layer_norm":
            grid = [(shape, None) for shape in LAYER_NORM]
        elif op == "group_norm":
            grid = GROUP_NORM
        else:
            grid = [(shape, shape[1]) for shape in POOL]
        if op != "batch_norm" and args.shape:
            grid = [(shape, co) for shape, co in grid if tuple(shape) in map(tuple, args.shape)]
        for dtype in dtypes:
            for shape, co in grid:
                case = {"op": op, "dtype": dtype, "shape": tuple(shape)}
                if op == "group_norm":
                    case["groups"] = co
                elif co is not None:
                    case["out_channels"] = co
                selected.append(case)
    return selected


def measure(args):
    import torch

    torch.set_num_threads(args.threads)
    for case in cases(args):
        line = torch_line(torch, case, args)
        print(json.dumps(line), flush=True)
        yield line


def table(ours, theirs, baseline=None):
    """Markdown table of ours / PyTorch per case; with `baseline` (lines of another build of the
    Rust benchmark, by case), its time and ours / baseline too."""
    extra = " baseline (us) | ours / baseline |" if baseline else ""
    print()
    print("| op | dtype | shape | ours (us) | PyTorch (us) | ours / PyTorch | composed / fused "
          "| fused / traffic bound |" + extra)
    print("|---|---|---|---:|---:|---:|---:|---:|" + ("---:|---:|" if baseline else ""))
    for o in ours:
        k = key(o)
        if k not in theirs:
            continue
        ratio = o["fused_us"] / theirs[k]["torch_us"]
        composed = f"{o['composed_us'] / o['fused_us']:.1f}x" if o.get("composed_us") else "-"
        bound = f"{o['fused_us'] / o['traffic_bound_us']:.2f}" if o.get("traffic_bound_us") else "-"
        shape = "x".join(map(str, o["shape"])) + (f" -> {o['out_channels']}" if k[0] == "conv2d" else "")
        row = (f"| {k[0]} | {o['dtype']} | {shape} | {o['fused_us']:.1f} "
               f"| {theirs[k]['torch_us']:.1f} | {ratio:.3f} | {composed} | {bound} |")
        if baseline:
            b = baseline[k]["fused_us"]
            row += f" {b:.1f} | {o['fused_us'] / b:.3f} |"
        print(row)


def compare(args):
    source = sys.stdin if args.ours == "-" else open(args.ours)
    ours = [json.loads(line) for line in source if line.strip().startswith("{")]
    wanted = {key(o) for o in ours}
    selected = [c for c in cases(argparse.Namespace(**dict(vars(args), op=None, shape=None, dtype=None)))
                if key(c) in wanted]
    import torch

    torch.set_num_threads(args.threads)
    theirs = {}
    for case in selected:
        line = torch_line(torch, case, args)
        print(json.dumps(line), flush=True)
        theirs[key(line)] = line
    table(ours, theirs)


def median_of(lines, key):
    values = [line[key] for line in lines]
    return None if None in values else statistics.median(values)


def run_bench(binary, case, args):
    """One run of a Rust benchmark binary on one case: its JSON line."""
    command = [binary, "--op", case["op"].replace("_", "-"), "--dtype", case["dtype"],
               "--shape", "x".join(map(str, case["shape"]))]
    if args.quick:
        command.append("--quick")
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def merged(rounds):
    """The first round's line with the medians of the rounds' timings."""
    line = dict(rounds[0])
    for field, digits in (("fused_us", 1), ("composed_us", 1), ("copy_gbps", 2), ("traffic_bound_us", 3)):
        if field in line:
            value = median_of(rounds, field)
            line[field] = None if value is None else round(value, digits)
    return line


def interleave(args):
    """Each case: the Rust benchmark's run (and the baseline build's) and PyTorch's in turn,
    `--rounds` times; medians."""
    import torch

    torch.set_num_threads(args.threads)
    ours, theirs, baseline = [], {}, {}
    for case in cases(args):
        rust_rounds, torch_rounds, baseline_rounds = [], [], []
        for _ in range(args.rounds):
            if args.baseline:
                baseline_rounds.append(run_bench(args.baseline, case, args))
            rust_rounds.append(run_bench(args.bench, case, args))
            torch_rounds.append(torch_line(torch, case, args))
        theirs_line = dict(torch_rounds[0], torch_us=round(median_of(torch_rounds, "torch_us"), 1))
        report = (f"{case['op']} {case['dtype']} {'x'.join(map(str, case['shape']))}: "
                  f"ours {[r['fused_us'] for r in rust_rounds]} us, "
                  f"PyTorch {[t['torch_us'] for t in torch_rounds]} us")
        if args.baseline:
            report += f", baseline {[r['fused_us'] for r in baseline_rounds]} us"
            baseline[key(case)] = merged(baseline_rounds)
        print(report, file=sys.stderr, flush=True)
        ours.append(merged(rust_rounds))
        theirs[key(case)] = theirs_line
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
    parser.add_argument("--op", choices=OPS, action="append", help="only this op (repeatable; default all)")
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

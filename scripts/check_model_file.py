#!/usr/bin/env python3
"""Check this project's model files with nothing of ours: Python's `safetensors` and `numpy`.

- `--mlp FILE --input X.json --logits OURS.json`: recompute the MLP's evaluation-mode logits in
  NumPy from the file (Linear, BatchNorm with its running statistics, sigmoid; PyTorch's
  formulas, eps 1e-5) on the inputs `x` of X.json, and compare them with the logits our
  `predict` example wrote for the same file and inputs (`--tol`, default 1e-5).
- `--cnn FILE`: check every key, shape and dtype of a CNN file (with BatchNorm) against
  PyTorch's `state_dict()` of the same net, and its metadata `{"arch": "cnn-bn", ...}`.

    cargo run --release --example train -- --steps 100 --out out
    cargo run --release --example predict -- --model out/mlp-bn-lr0.05.safetensors \\
        --input tests/data/pytorch_mlp_bn_io.json --logits out/mlp-logits.json
    python3 scripts/check_model_file.py --mlp out/mlp-bn-lr0.05.safetensors \\
        --input tests/data/pytorch_mlp_bn_io.json --logits out/mlp-logits.json \\
        --cnn out/cnn-bn-lr0.05.safetensors

Needs `pip install safetensors numpy`. Exits 1 on any mismatch.
"""

import argparse
import json
import sys

import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file

EPS = 1e-5


def array(value):
    return np.array(value["data"], dtype=np.float64).reshape(value["shape"])


def mlp_logits(tensors, x):
    """The MLP (Linear, [BatchNorm], sigmoid) x 3, then Linear, in evaluation mode."""
    h = x.astype(np.float32)
    # Linear layers at indices 0, 3, 6, 9 with BatchNorm (1, 4, 7), or 0, 2, 4, 6 without.
    batchnorm = "1.running_mean" in tensors
    step = 3 if batchnorm else 2
    for layer in range(4):
        i = layer * step
        h = h @ tensors[f"{i}.weight"].T + tensors[f"{i}.bias"]
        if layer == 3:
            return h
        if batchnorm:
            b = f"{i + 1}."
            h = (h - tensors[b + "running_mean"]) / np.sqrt(tensors[b + "running_var"] + EPS)
            h = h * tensors[b + "weight"] + tensors[b + "bias"]
        h = 1.0 / (1.0 + np.exp(-h))


def check_mlp(args):
    tensors = load_file(args.mlp)
    with open(args.input) as f:
        x = array(json.load(f)["x"])
    with open(args.logits) as f:
        ours = array(json.load(f)["logits"])
    theirs = mlp_logits(tensors, x)
    error = float(np.max(np.abs(theirs - ours)))
    print(f"MLP {args.mlp}: NumPy's logits against ours on {x.shape[0]} inputs: max abs difference {error:.2e}")
    return error <= args.tol


def expected_cnn():
    """PyTorch's state_dict() of the CNN with BatchNorm: key -> (shape, dtype)."""
    expected = {}
    for conv, bn, c_in, c_out in [(0, 1, 1, 16), (3, 4, 16, 32)]:
        expected[f"{conv}.weight"] = ((c_out, c_in, 3, 3), "float32")
        expected[f"{conv}.bias"] = ((c_out,), "float32")
        for name in ["weight", "bias", "running_mean", "running_var"]:
            expected[f"{bn}.{name}"] = ((c_out,), "float32")
        expected[f"{bn}.num_batches_tracked"] = ((), "int64")
    expected["8.weight"] = ((10, 512), "float32")
    expected["8.bias"] = ((10,), "float32")
    return expected


def check_cnn(args):
    tensors = load_file(args.cnn)
    got = {key: (tuple(value.shape), str(value.dtype)) for key, value in tensors.items()}
    expected = expected_cnn()
    ok = True
    for key in sorted(set(expected) | set(got)):
        if expected.get(key) != got.get(key):
            print(f"CNN {args.cnn}: {key}: expected {expected.get(key)}, got {got.get(key)}")
            ok = False
    with safe_open(args.cnn, framework="numpy") as f:
        metadata = f.metadata() or {}
    if metadata.get("arch") != "cnn-bn":
        print(f"CNN {args.cnn}: metadata {metadata}, expected an \"arch\" of \"cnn-bn\"")
        ok = False
    if ok:
        print(f"CNN {args.cnn}: {len(got)} tensors with PyTorch's keys, shapes and dtypes; metadata {metadata}")
    return ok


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mlp", help="an MLP file saved by train")
    parser.add_argument("--input", help="with --mlp: JSON with the inputs x")
    parser.add_argument("--logits", help="with --mlp: JSON with our logits for them (from predict)")
    parser.add_argument("--cnn", help="a CNN-with-BatchNorm file saved by train")
    parser.add_argument("--tol", type=float, default=1e-5)
    args = parser.parse_args()
    if args.mlp and not (args.input and args.logits):
        sys.exit("--mlp needs --input and --logits")
    if not (args.mlp or args.cnn):
        sys.exit("give --mlp (with --input and --logits) and/or --cnn")
    ok = True
    if args.mlp:
        ok &= check_mlp(args)
    if args.cnn:
        ok &= check_cnn(args)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()

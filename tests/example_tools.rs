//! The example tools check every flag before any work: a bad one exits with 2 and a message that
//! names the flag and its value, never a panic (exit 101).
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::path::PathBuf;
use std::process::{Command, Output};

/// The example binary `name`, built beside this test (`cargo test` builds the examples first).
fn example(name: &str) -> PathBuf {
    let deps = std::env::current_exe().unwrap();
    let profile = deps.parent().and_then(|d| d.parent()).unwrap();
    let path = profile.join("examples").join(name);
    assert!(
        path.exists(),
        "{} is not built: run the tests with `cargo test` (which builds the examples), or `cargo \
         build --examples` first",
        path.display()
    );
    path
}

fn run(name: &str, args: &[&str]) -> Output {
    Command::new(example(name)).args(args).output().unwrap()
}

/// Runs the tool and checks that it exits with 2 and prints `message` on stderr.
fn assert_usage_error(name: &str, args: &[&str], message: &str) {
    let output = run(name, args);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{name} {args:?}: {stderr}");
    assert!(stderr.contains(message), "{name} {args:?}: {stderr}");
    assert!(
        output.stdout.is_empty(),
        "{name} {args:?} did work before failing"
    );
}

#[test]
fn train_names_the_bad_flag_and_its_value_before_training() {
    let out = std::env::temp_dir().join(format!("bnorm-train-flags-{}", std::process::id()));
    let out = out.to_str().unwrap();
    for (args, message) in [
        (&["--lr", "NaN"][..], "--lr must be a finite number > 0, got NaN"),
        (&["--lr", "0"], "--lr must be a finite number > 0, got 0"),
        (&["--lr", "-1"], "--lr must be a finite number > 0, got -1"),
        (
            &["--high-lr", "inf"],
            "--high-lr must be a finite number > 0, got inf",
        ),
        (&["--steps", "0"], "--steps must be at least 1, got 0"),
        (
            &["--clip-norm", "-1"],
            "--clip-norm must be a finite number >= 0 (0: no clipping), got -1",
        ),
        (
            &["--grad-penalty", "NaN"],
            "--grad-penalty must be a finite number >= 0 (0: no such run), got NaN",
        ),
        (&["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
        (&["--eval-every", "0"], "--eval-every must be at least 1, got 0"),
        (
            &["--batch-size", "5000"],
            "--batch-size must be at most the 1438 training images, got 5000",
        ),
        (
            &["--out", "/proc/bnorm/out"],
            "--out /proc/bnorm/out: cannot create it",
        ),
    ] {
        let with_out: Vec<&str> = args.iter().copied().chain(["--out", out]).collect();
        let args = if args.contains(&"--out") {
            args.to_vec()
        } else {
            with_out
        };
        assert_usage_error("train", &args, message);
    }
    let _ = std::fs::remove_dir_all(out);
}

#[test]
fn golden_rejects_a_bad_tolerance_and_a_crafted_file() {
    let file = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/pytorch_batchnorm.json");
    for (tol, message) in [
        ("-1", "--tol must be a finite number >= 0, got -1"),
        ("NaN", "--tol must be a finite number >= 0, got NaN"),
    ] {
        assert_usage_error("golden", &[file, "--tol", tol], message);
    }
    // A shape whose element count overflows: it panicked (exit 101) instead of exiting with 2.
    let text = std::fs::read_to_string(file).unwrap();
    let crafted = text.replacen("\"shape\": [3, 2]", "\"shape\": [9223372036854775811, 2]", 1);
    let path = std::env::temp_dir().join(format!("bnorm-crafted-{}.json", std::process::id()));
    std::fs::write(&path, crafted).unwrap();
    let output = run("golden", &[path.to_str().unwrap()]);
    let _ = std::fs::remove_file(&path);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("is larger than an array can be"), "{stderr}");
}

#[test]
fn bench_rejects_shapes_it_cannot_time() {
    // They panicked inside the kernel or the tape.
    for (shape, message) in [
        (
            "1x4",
            "\"1x4\" has 1 value per channel, expected at least 2 (BatchNorm in training)",
        ),
        ("0x4", "\"0x4\" has a size of 0; every size must be at least 1"),
        (
            "2x3x0",
            "\"2x3x0\" has a size of 0; every size must be at least 1",
        ),
    ] {
        assert_usage_error("bench", &["--shape", shape], message);
    }
}

#[test]
fn train_runs_both_models_and_labels_each_run() {
    let out = std::env::temp_dir().join(format!("bnorm-train-models-{}", std::process::id()));
    let out_flag = out.to_str().unwrap();
    let output = run(
        "train",
        &["--steps", "20", "--eval-every", "10", "--out", out_flag],
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("| MLP   |") && stdout.contains("| CNN   |"),
        "{stdout}"
    );
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    let models: Vec<&str> = summary["runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|run| run["model"].as_str().unwrap())
        .collect();
    assert_eq!(
        models,
        [
            "mlp", "mlp", "mlp", "mlp", "mlp", "mlp", "mlp", "cnn", "cnn", "cnn", "cnn"
        ]
    );
    // The seventh MLP run is BatchNorm's again, with the gradient penalty.
    assert_eq!(summary["runs"][6]["norm"], "batch");
    assert_eq!(summary["runs"][6]["input_grad_penalty"], 100.0);
    assert!(
        stdout.contains("| with BatchNorm + gradient penalty 100 "),
        "{stdout}"
    );
    let norms: Vec<&str> = summary["runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|run| run["norm"].as_str().unwrap())
        .collect();
    assert_eq!(norms[..3], ["none", "batch", "layer"]);
    assert!(stdout.contains("| with LayerNorm "), "{stdout}");
    for run in summary["runs"].as_array().unwrap() {
        assert_eq!(
            (run["schedule"].as_str(), run["clip_norm"].as_f64()),
            (Some("warmup-cosine"), Some(1.0))
        );
    }
    for file in ["accuracy.png", "accuracy.svg"] {
        assert!(out.join(file).metadata().unwrap().len() > 1000, "{file}");
    }

    let output = run(
        "train",
        &[
            "--model",
            "cnn",
            "--steps",
            "5",
            "--eval-every",
            "5",
            "--out",
            out_flag,
        ],
    );
    assert!(output.status.success());
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["runs"].as_array().unwrap().len(), 4);
    assert!(
        summary["runs"]
            .as_array()
            .unwrap()
            .iter()
            .all(|run| run["model"] == "cnn")
    );
    assert_usage_error("train", &["--model", "rnn"], "invalid value 'rnn' for '--model");
    std::fs::remove_dir_all(&out).unwrap();
}

#[test]
fn bench_prints_a_json_line_per_case_of_each_op() {
    let output = run(
        "bench",
        &[
            "--quick",
            "--op",
            "conv2d",
            "--op",
            "max-pool2d",
            "--shape",
            "64x1x8x8",
            "--shape",
            "32x32x28x28",
        ],
    );
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["op"], "conv2d");
    assert_eq!(lines[0]["shape"], serde_json::json!([64, 1, 8, 8]));
    assert_eq!(lines[0]["out_channels"], 16);
    assert_eq!(lines[1]["op"], "max_pool2d");
    for line in &lines {
        for key in ["dtype", "kernel", "stride", "padding", "fused_us", "composed_us"] {
            assert!(!line[key].is_null(), "{key} in {line}");
        }
        assert!(line["fused_us"].as_f64().unwrap() > 0.0);
    }
}

#[test]
fn predict_reproduces_training_and_pytorchs_logits() {
    let out = std::env::temp_dir().join(format!("bnorm-predict-{}", std::process::id()));
    let out_flag = out.to_str().unwrap();
    let train = run(
        "train",
        &[
            "--model",
            "all",
            "--steps",
            "30",
            "--eval-every",
            "10",
            "--out",
            out_flag,
        ],
    );
    assert!(
        train.status.success(),
        "{}",
        String::from_utf8_lossy(&train.stderr)
    );
    assert!(String::from_utf8_lossy(&train.stdout).contains("saved the trained nets: "));
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    for run_summary in summary["runs"].as_array().unwrap() {
        let suffix = match run_summary["norm"].as_str().unwrap() {
            "none" => "",
            "batch" => "-bn",
            "layer" => "-ln",
            other => panic!("norm {other:?}"),
        };
        assert_eq!(run_summary["batchnorm"].as_bool().unwrap(), suffix == "-bn");
        let arch = format!("{}{suffix}", run_summary["model"].as_str().unwrap());
        let rate = run_summary["learning_rate"].as_f64().unwrap();
        let penalty = run_summary["input_grad_penalty"]
            .as_f64()
            .map_or(String::new(), |l| format!("-gp{l}"));
        let file = out.join(format!("{arch}-lr{rate}{penalty}.safetensors"));
        let predict = run("predict", &["--model", file.to_str().unwrap()]);
        let stdout = String::from_utf8_lossy(&predict.stdout);
        let reported = 100.0 * run_summary["final_test_accuracy"].as_f64().unwrap();
        assert!(
            stdout.contains(&format!("accuracy {reported:.1}%")),
            "{file:?}: {stdout}"
        );
    }

    // PyTorch's file as it is, with the architecture given.
    let data = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/");
    let logits = out.join("logits.json");
    let predict = run(
        "predict",
        &[
            "--model",
            &format!("{data}pytorch_cnn_bn.safetensors"),
            "--arch",
            "cnn-bn",
            "--input",
            &format!("{data}pytorch_cnn_bn_io.json"),
            "--logits",
            logits.to_str().unwrap(),
        ],
    );
    assert!(
        predict.status.success(),
        "{}",
        String::from_utf8_lossy(&predict.stderr)
    );
    let ours: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&logits).unwrap()).unwrap();
    let io: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(format!("{data}pytorch_cnn_bn_io.json")).unwrap())
            .unwrap();
    assert_eq!(ours["logits"]["shape"], io["logits_f32"]["shape"]);
    let values = |v: &serde_json::Value| -> Vec<f64> {
        v["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect()
    };
    let error = values(&ours["logits"])
        .iter()
        .zip(values(&io["logits_f32"]))
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    assert!(error <= 1e-5, "{error:e}");
    std::fs::remove_dir_all(&out).unwrap();
}

#[test]
fn predict_names_what_is_wrong_and_exits_with_2() {
    let data = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/");
    let cnn = format!("{data}pytorch_cnn_bn.safetensors");
    let assert_fails = |args: &[&str], message: &str| {
        let output = run("predict", args);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(message), "{args:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    };
    assert_fails(
        &["--model", &cnn],
        "records no architecture (PyTorch's files do not); give --arch",
    );
    assert_fails(
        &["--model", &cnn, "--arch", "mlp"],
        "does not fit the mlp architecture: state dict's \"0.bias\" has shape [16], expected [100]",
    );
    assert_fails(&["--model", "no/such/file"], "--model no/such/file: No such file");
    assert_fails(&["--model", data], "--model");
    let golden = format!("{data}pytorch_batchnorm.json");
    assert_fails(
        &["--model", &cnn, "--arch", "cnn-bn", "--input", &golden],
        "expected {\"x\"",
    );
    let mlp_input = format!("{data}pytorch_mlp_bn_io.json");
    // Rows of 64 pixels are reshaped to images; the MLP's file's inputs then fit the CNN.
    let output = run(
        "predict",
        &["--model", &cnn, "--arch", "cnn-bn", "--input", &mlp_input],
    );
    assert!(output.status.success());
}

#[test]
fn the_hessian_example_passes_its_own_checks() {
    // The example exits with an error when a Hessian disagrees with finite differences or with
    // the composition, or when Newton's method does not reach the minimum.
    let output = run("hessian", &[]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(stdout.matches(") ok").count(), 6, "{stdout}");
    assert!(!stdout.contains("FAILED"), "{stdout}");
}

#[test]
fn backprop_walkthrough_writes_both_pages() {
    let out = std::env::temp_dir().join(format!("bnorm-pages-{}", std::process::id()));
    let page = out.join("backprop.html");
    let output = run("backprop_walkthrough", &["--html", page.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    for file in ["backprop.html", "backprop_mlp_step.html"] {
        let html = std::fs::read_to_string(out.join(file)).unwrap();
        assert!(
            html.starts_with("<!DOCTYPE html>") && html.contains("tape-data"),
            "{file}"
        );
    }
    let _ = std::fs::remove_dir_all(out);
}

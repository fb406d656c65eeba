//! Nets trained in PyTorch load here and compute PyTorch's logits; nets saved here are
//! safetensors files under PyTorch's names and types. The files are in `tests/data/` (see its
//! README).
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::path::{Path, PathBuf};

use bnorm::models::{Model, Norm};
use layers::{Mode, Module, Sequential};
use ndarray::ArrayD;
use serde_json::Value;
use tape::{Element, Tape};

fn data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name)
}

/// An array of the golden format, `{"shape", "data"}`.
fn array<T: Element>(value: &Value) -> ArrayD<T> {
    let shape: Vec<usize> = value["shape"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_u64().unwrap() as usize)
        .collect();
    let values = value["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| T::from_f64_lossy(v.as_f64().unwrap()));
    ArrayD::from_shape_vec(shape, values.collect()).unwrap()
}

fn max_abs_difference<T: Element>(ours: &ArrayD<T>, reference: &ArrayD<f64>) -> f64 {
    assert_eq!(ours.shape(), reference.shape());
    ours.iter()
        .zip(reference)
        .map(|(a, b)| (a.as_f64() - b).abs())
        .fold(0.0, f64::max)
}

/// The net of `model` (with BatchNorm) loaded from PyTorch's file, and its evaluation-mode
/// logits on the file's inputs, against PyTorch's.
fn logits_error<T: Element>(model: Model, name: &str) -> f64 {
    let io: Value =
        serde_json::from_str(&std::fs::read_to_string(data(&format!("{name}_io.json"))).unwrap()).unwrap();
    let mut net: Sequential<T> = model.build(Norm::Batch, 0);
    let metadata = net
        .load_safetensors(data(&format!("{name}.safetensors")))
        .unwrap();
    assert!(metadata.is_empty(), "PyTorch's files have no metadata");
    let keys: Vec<&str> = io["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k.as_str().unwrap())
        .collect();
    let mut ours: Vec<String> = net.state_dict().into_keys().collect();
    let mut theirs: Vec<String> = keys.iter().map(|k| k.to_string()).collect();
    ours.sort();
    theirs.sort();
    assert_eq!(ours, theirs);
    let tape = Tape::new();
    let logits = net
        .forward(tape.constant(array::<T>(&io["x"])), Mode::Eval)
        .unwrap();
    let reference = if T::NAME == "f32" {
        &io["logits_f32"]
    } else {
        &io["logits_f64"]
    };
    max_abs_difference(&logits.value(), &array::<f64>(reference))
}

#[test]
fn pytorch_nets_compute_pytorchs_logits() {
    for (model, name) in [(Model::Mlp, "pytorch_mlp_bn"), (Model::Cnn, "pytorch_cnn_bn")] {
        let f32_error = logits_error::<f32>(model, name);
        let f64_error = logits_error::<f64>(model, name);
        assert!(f32_error <= 1e-5, "{name} f32: {f32_error:e}");
        assert!(f64_error <= 1e-10, "{name} f64: {f64_error:e}");
    }
}

/// A folder of its own under the temporary directory.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("bnorm-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The JSON header of a safetensors file.
fn header(path: &Path) -> Value {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    serde_json::from_slice(&bytes[8..8 + n]).unwrap()
}

#[test]
fn saved_nets_use_pytorchs_names_and_types_and_load_back() {
    let dir = scratch("save");
    let path = dir.join("cnn-bn.safetensors");
    let mut net: Sequential<f32> = Model::Cnn.build(Norm::Batch, 3);
    let tape = Tape::new();
    let x = Model::Cnn.input(ndarray::Array2::from_shape_fn((6, 64), |(i, j)| {
        ((i * 64 + j) % 17) as f32 / 8.0 - 1.0
    }));
    net.forward(tape.constant(x), Mode::Train).unwrap();
    net.save_safetensors(&path).unwrap();

    let header = header(&path);
    assert_eq!(header["__metadata__"]["arch"], "cnn-bn");
    assert_eq!(header["0.weight"]["dtype"], "F32");
    assert_eq!(header["0.weight"]["shape"], serde_json::json!([16, 1, 3, 3]));
    assert_eq!(header["8.weight"]["shape"], serde_json::json!([10, 512]));
    assert_eq!(header["1.num_batches_tracked"]["dtype"], "I64");
    assert_eq!(header["1.num_batches_tracked"]["shape"], serde_json::json!([]));
    let files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(files.len(), 1, "no temporary file is left behind: {files:?}");

    // Back into a net of another seed, in f32 and in f64.
    let mut same: Sequential<f32> = Model::Cnn.build(Norm::Batch, 4);
    let metadata = same.load_safetensors(&path).unwrap();
    assert_eq!(metadata.get("arch").map(String::as_str), Some("cnn-bn"));
    assert_eq!(same.state_dict(), net.state_dict());
    let mut wide: Sequential<f64> = Model::Cnn.build(Norm::Batch, 4);
    wide.load_safetensors(&path).unwrap();
    assert_eq!(
        wide.state_dict()["3.weight"],
        net.state_dict()["3.weight"].mapv(f64::from)
    );
    assert_eq!(
        wide.state_dict()["1.num_batches_tracked"],
        ndarray::arr0(1.0).into_dyn()
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_files_are_clear_errors_that_change_nothing() {
    let dir = scratch("bad");
    let good = data("pytorch_mlp_bn.safetensors");
    let mut net: Sequential<f32> = Model::Mlp.build(Norm::Batch, 0);
    let before = net.state_dict();
    let mut load = |path: &Path| net.load_safetensors(path).unwrap_err().to_string();

    let bytes = std::fs::read(&good).unwrap();
    let truncated = dir.join("truncated.safetensors");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    assert!(
        load(&truncated).contains("not a safetensors file"),
        "{}",
        load(&truncated)
    );
    let text = dir.join("text.safetensors");
    std::fs::write(&text, "a CSV, not a model").unwrap();
    assert!(load(&text).contains("not a safetensors file"));
    assert!(
        load(&dir).starts_with(&format!("{}: ", dir.display())),
        "a folder: {}",
        load(&dir)
    );
    assert!(load(&dir.join("missing.safetensors")).contains("No such file"));
    // The CNN's file into the MLP.
    assert_eq!(
        load(&data("pytorch_cnn_bn.safetensors")),
        "state dict's \"0.bias\" has shape [16], expected [100]"
    );

    // A weight stored as integers.
    let mut header = header(&good);
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    header["0.bias"]["dtype"] = "I32".into();
    let new_header = serde_json::to_vec(&header).unwrap();
    let mut forged = (new_header.len() as u64).to_le_bytes().to_vec();
    forged.extend(&new_header);
    forged.extend(&bytes[8 + n..]);
    let integer = dir.join("integer.safetensors");
    std::fs::write(&integer, forged).unwrap();
    assert_eq!(
        load(&integer),
        "tensor \"0.bias\" is I32, expected a float tensor (F32 or F64)"
    );
    assert_eq!(
        net.state_dict(),
        before,
        "every failed load left the net as it was"
    );

    // Saving into a folder that does not exist fails, naming the path.
    let nowhere = dir.join("no/such/folder/net.safetensors");
    let error = net.save_safetensors(&nowhere).unwrap_err().to_string();
    assert!(error.starts_with(&nowhere.display().to_string()), "{error}");
    std::fs::remove_dir_all(&dir).unwrap();
}

//! Evaluates a saved net: one that `train` saved, or one trained in PyTorch and saved with
//! `safetensors.torch.save_file` under the main job's architecture.
//!
//! ```sh
//! cargo run --release --example predict -- --model out/cnn-bn-lr0.05.safetensors
//! cargo run --release --example predict -- --model tests/data/pytorch_mlp_bn.safetensors --arch mlp-bn \
//!     --input tests/data/pytorch_mlp_bn_io.json --logits logits.json
//! ```
//!
//! Without `--input` it evaluates the digits test split (the split of the seed the file records,
//! as training made it) and prints the accuracy, the one training reported for that net. With
//! `--input` (`{"x": {"shape": [N, 64] or [N, 1, 8, 8], "data": [...]}}`, the golden files'
//! format) it prints the evaluation-mode logits as `{"logits": {"shape", "data"}}`, or writes
//! them to `--logits FILE` (with the accuracy when the input has `labels`). A bad path, architecture or shape is one line on stderr and
//! exit code 2.

#[cfg(not(feature = "system-alloc"))]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::PathBuf;
use std::process::ExitCode;

use bnorm::golden;
use bnorm::layers::{Mode, Module, Sequential, accuracy, files};
use bnorm::models::Model;
use bnorm::tape::Tape;
use clap::{Parser, ValueEnum};
use layers::datasets::digits::{self, Standardizer};
use ndarray::ArrayD;
use serde_json::{Value, json};

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Arch {
    Mlp,
    MlpBn,
    MlpLn,
    Cnn,
    CnnBn,
    CnnLn,
}

/// Evaluate a saved net (ours or PyTorch's) on the digits test split or on given inputs.
#[derive(Parser, Debug)]
struct Args {
    /// The model file (safetensors).
    #[arg(long)]
    model: PathBuf,
    /// The architecture [default: the file's metadata; PyTorch's files have none].
    #[arg(long, value_enum)]
    arch: Option<Arch>,
    /// Inputs as JSON, {"x": {"shape", "data"}} [default: the digits test split].
    #[arg(long)]
    input: Option<PathBuf>,
    /// Write the logits here as JSON, {"logits": {"shape", "data"}}.
    #[arg(long)]
    logits: Option<PathBuf>,
    /// Seed of the digits split [default: the file's metadata, else 0].
    #[arg(long)]
    seed: Option<u64>,
    /// A gzipped CSV of digits, 64 pixels then the label per line [default: the digits bundled
    /// in the layers crate].
    #[arg(long)]
    data: Option<PathBuf>,
}

fn main() -> ExitCode {
    match run(&Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::from(2)
        }
    }
}

fn run(args: &Args) -> Result<(), String> {
    let (dict, metadata) = files::load_safetensors::<f32>(&args.model).map_err(|e| format!("--model {e}"))?;
    let arch = match (args.arch, metadata.get("arch")) {
        (Some(arch), _) => arch
            .to_possible_value()
            .map(|v| v.get_name().to_string())
            .unwrap_or_default(),
        (None, Some(arch)) => arch.clone(),
        (None, None) => {
            return Err(format!(
                "{} records no architecture (PyTorch's files do not); give --arch mlp, mlp-bn, mlp-ln, cnn, cnn-bn or cnn-ln",
                args.model.display()
            ));
        }
    };
    let (model, norm) = Model::from_arch(&arch)
        .ok_or_else(|| format!("unknown architecture {arch:?} in {}", args.model.display()))?;
    let mut net: Sequential<f32> = model.build(norm, 0);
    net.load_state_dict(&dict, true).map_err(|e| {
        format!(
            "{} does not fit the {arch} architecture: {e}",
            args.model.display()
        )
    })?;

    let (x, labels) = match &args.input {
        Some(path) => read_input(path)?,
        None => {
            let data = match &args.data {
                Some(path) => digits::load(path).map_err(|e| format!("--data: {e}"))?,
                None => digits::load_bundled().map_err(|e| e.to_string())?,
            };
            let seed = match (args.seed, metadata.get("seed")) {
                (Some(seed), _) => seed,
                (None, Some(seed)) => seed
                    .parse()
                    .map_err(|_| format!("the file's seed {seed:?} is not a number"))?,
                (None, None) => 0,
            };
            let (train, test) = digits::split(&data, 0.2, seed).map_err(|e| e.to_string())?;
            let test = Standardizer::fit(&train).apply(&test);
            println!("digits test split of seed {seed}: {} images", test.len());
            (
                test.features().mapv(|v| v as f32).into_dyn(),
                Some(test.labels().to_vec()),
            )
        }
    };
    // Rows of 64 pixels become images for the CNN.
    let x = match (model, x.shape()) {
        (Model::Cnn, &[_, 64]) => {
            let rows = x.into_dimensionality().map_err(|e| e.to_string())?;
            model.input::<f32>(rows)
        }
        _ => x,
    };
    let tape = Tape::no_grad();
    let logits = net
        .forward(tape.constant(x), Mode::Eval)
        .map_err(|e| format!("the input does not fit a {arch} net: {e}"))?
        .value()
        .as_ref()
        .clone();
    let json = json!({"logits": {"shape": logits.shape(), "data": logits.iter().collect::<Vec<_>>()}});
    match (&args.input, &args.logits) {
        // Inputs and no file: the logits are the output.
        (Some(_), None) => println!("{json}"),
        (_, logits_path) => {
            let summary = match &labels {
                Some(labels) => {
                    let accuracy = accuracy(&logits, labels).map_err(|e| e.to_string())?;
                    format!("accuracy {:.1}%", 100.0 * accuracy)
                }
                None => format!("{} inputs", logits.shape()[0]),
            };
            println!("{arch} from {}: {summary}", args.model.display());
            if let Some(path) = logits_path {
                std::fs::write(path, json.to_string() + "\n")
                    .map_err(|e| format!("--logits {}: {e}", path.display()))?;
                println!("wrote {}", path.display());
            }
        }
    }
    Ok(())
}

/// The inputs `x` of a JSON file, and its `labels` if it has them.
fn read_input(path: &PathBuf) -> Result<(ArrayD<f32>, Option<Vec<usize>>), String> {
    let at = |problem: &str| format!("--input {}: {problem}", path.display());
    let text = std::fs::read_to_string(path).map_err(|e| at(&e.to_string()))?;
    let root: Value = serde_json::from_str(&text).map_err(|e| at(&format!("not JSON: {e}")))?;
    let x = root
        .get("x")
        .ok_or_else(|| at("expected {\"x\": {\"shape\": [whole numbers], \"data\": [numbers]}}"))?;
    let x = golden::parse_tensor(x, "x")
        .map_err(|e| at(&e.to_string()))?
        .to_array::<f32>();
    let labels = root["labels"]
        .as_array()
        .and_then(|labels| labels.iter().map(|l| l.as_u64().map(|l| l as usize)).collect());
    Ok((x, labels))
}

//! Checks this project's BatchNorm (also its second derivatives), convolution, pooling, LayerNorm
//! and GroupNorm against a golden file of PyTorch results.
//!
//! ```sh
//! cargo run --release --example golden -- tests/data/pytorch_batchnorm.json --dtype f32
//! cargo run --release --example golden -- tests/data/pytorch_conv_pool.json
//! cargo run --release --example golden -- tests/data/pytorch_layer_group_norm.json
//! cargo run --release --example golden -- tests/data/pytorch_batchnorm_double_backward.json
//! ```
//!
//! Prints one line per case with the relative error (max abs error / max abs reference) of each
//! result, and exits with status 1 if any exceeds the tolerance (2 for an unusable file).

use std::process::ExitCode;

use bnorm::golden::{self, CaseReport, GoldenError};
use clap::{Parser, ValueEnum};

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Dtype {
    F32,
    F64,
}

/// Check BatchNorm, conv2d, pooling, LayerNorm and GroupNorm against golden results (PyTorch's format: see
/// tests/data/README.md).
#[derive(Parser, Debug)]
#[command(allow_negative_numbers = true)]
struct Args {
    /// The golden JSON file.
    path: std::path::PathBuf,
    /// Precision to compute in (the file's inputs are exact in f32).
    #[arg(long, value_enum, default_value = "f64")]
    dtype: Dtype,
    /// Largest relative error allowed [default: 1e-10 for f64, 1e-5 for f32].
    #[arg(long)]
    tol: Option<f64>,
}

fn run(args: &Args) -> Result<bool, GoldenError> {
    let cases = golden::load(&args.path)?;
    let tolerance = args.tol.unwrap_or(match args.dtype {
        Dtype::F64 => 1e-10,
        Dtype::F32 => 1e-5,
    });
    println!(
        "{} cases from {} in {:?}, tolerance {tolerance:e}",
        cases.len(),
        args.path.display(),
        args.dtype
    );
    let mut failed = 0;
    for case in &cases {
        let report: CaseReport = match args.dtype {
            Dtype::F64 => golden::check_case::<f64>(case)?,
            Dtype::F32 => golden::check_case::<f32>(case)?,
        };
        let pass = report.max_error() <= tolerance;
        failed += usize::from(!pass);
        println!("{} {report}", if pass { "ok  " } else { "FAIL" });
    }
    println!(
        "{} of {} cases within {tolerance:e}",
        cases.len() - failed,
        cases.len()
    );
    Ok(failed == 0)
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(tol) = args.tol.filter(|tol| !(tol.is_finite() && *tol >= 0.0)) {
        eprintln!("error: --tol must be a finite number >= 0, got {tol}");
        return ExitCode::from(2);
    }
    match run(&args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::from(2)
        }
    }
}

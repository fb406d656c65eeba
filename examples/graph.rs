//! Draws BatchNorm composed from tape primitives next to the fused node, as Graphviz graphs.
//!
//! ```sh
//! cargo run --release --example graph              # writes out/batchnorm_composed.* and out/batchnorm_fused.*
//! cargo run --release --example graph -- --out docs
//! ```
//!
//! Writes DOT files, and SVG next to them when Graphviz's `dot` is installed (otherwise it says
//! how to render them).

use std::error::Error;
use std::path::{Path, PathBuf};
use std::process::Command;

use clap::Parser;
use ndarray::array;
use tape::Tape;

/// Draw the composed and the fused BatchNorm graphs.
#[derive(Parser, Debug)]
struct Args {
    /// Folder for the .dot (and .svg) files.
    #[arg(long, default_value = "out")]
    out: PathBuf,
}

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), Box<dyn Error>> {
    let args = Args::parse();
    std::fs::create_dir_all(&args.out).map_err(|e| format!("cannot create {}: {e}", args.out.display()))?;

    // 3 rows, 2 features.
    let x = array![[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]];
    let (gamma, beta) = (array![1.0, 1.0], array![0.0, 0.0]);

    let composed = Tape::<f64>::new();
    let y = layers::batch_norm_composed(
        composed.var(x.clone()),
        composed.var(gamma.clone()),
        composed.var(beta.clone()),
        1e-5,
    )?;
    let fused = Tape::<f64>::new();
    let z = layers::batch_norm(fused.var(x), fused.var(gamma), fused.var(beta), 1e-5)?;
    println!(
        "composed: {} nodes, {} bytes kept for backward",
        composed.len(),
        composed.saved_bytes()
    );
    println!(
        "fused:    {} nodes, {} bytes kept for backward",
        fused.len(),
        fused.saved_bytes()
    );
    println!("same output: {}", y.value().abs_diff_eq(&z.value(), 1e-12));

    for (name, tape) in [("batchnorm_composed", &composed), ("batchnorm_fused", &fused)] {
        let dot_path = args.out.join(format!("{name}.dot"));
        std::fs::write(&dot_path, tape.to_dot())
            .map_err(|e| format!("cannot write {}: {e}", dot_path.display()))?;
        render(&dot_path)?;
    }
    Ok(())
}

/// Renders `path` to SVG beside it with Graphviz, or says how to.
fn render(dot_path: &Path) -> Result<(), Box<dyn Error>> {
    let svg_path = dot_path.with_extension("svg");
    match Command::new("dot")
        .arg("-Tsvg")
        .arg(dot_path)
        .arg("-o")
        .arg(&svg_path)
        .status()
    {
        Ok(status) if status.success() => println!("wrote {} and {}", dot_path.display(), svg_path.display()),
        Ok(status) => return Err(format!("dot failed on {} ({status})", dot_path.display()).into()),
        Err(_) => {
            println!(
                "wrote {}; Graphviz's `dot` is not installed. Install it",
                dot_path.display()
            );
            println!("(apt-get install graphviz) and render it with");
            println!("  dot -Tsvg {} -o {}", dot_path.display(), svg_path.display());
        }
    }
    Ok(())
}

//! Draws BatchNorm composed from tape primitives next to the fused node, as Graphviz graphs;
//! then the graph each one's backward pass records (`Tape::grad` with `create_graph`), the
//! chain rule as a graph: the composition's backward is a primitive for every rule it applies,
//! the fused node's is one fused node, `batch_norm_backward`.
//!
//! ```sh
//! cargo run --release --example graph              # writes out/batchnorm_{composed,fused}[_backward].*
//! cargo run --release --example graph -- --out docs/graphs
//! ```
//!
//! Writes DOT files, and SVG next to them when Graphviz's `dot` is installed (otherwise it says
//! how to render them).

use std::error::Error;
use std::path::{Path, PathBuf};
use std::process::Command;

use clap::Parser;
use ndarray::array;
use tape::{GradOptions, Tape};

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
        write(&args.out, name, tape)?;
    }

    // The backward of L = Σ dout · BN(x), recorded: a graph that can be differentiated again.
    let dout = array![[0.1, -0.4], [0.7, 0.2], [-0.3, 0.9]];
    let recorded = || GradOptions {
        create_graph: true,
        upstream: None,
    };
    for (name, tape, y) in [
        ("batchnorm_composed", &composed, y),
        ("batchnorm_fused", &fused, z),
    ] {
        let loss = y.try_mul(tape.constant(dout.clone()))?.sum();
        let inputs: Vec<_> = tape.vars().into_iter().filter(|v| v.op_name() == "var").collect();
        tape.grad(loss, &inputs, recorded())?;
        let backward = tape.recorded_backwards()[0].clone();
        let fused_nodes: Vec<String> = backward
            .clone()
            .map(|i| tape.vars()[i].op_name())
            .filter(|op| op.starts_with("batch_norm"))
            .collect();
        println!(
            "{name}: the recorded backward adds {} nodes{}",
            backward.len(),
            if fused_nodes.is_empty() {
                String::new()
            } else {
                format!(", among them the fused {}", fused_nodes.join(", "))
            }
        );
        write(&args.out, &format!("{name}_backward"), tape)?;
    }
    Ok(())
}

/// Writes `tape` as `<name>.dot` in `out`, and renders it.
fn write<T: tape::Element>(out: &Path, name: &str, tape: &Tape<T>) -> Result<(), Box<dyn Error>> {
    let dot_path = out.join(format!("{name}.dot"));
    std::fs::write(&dot_path, tape.to_dot())
        .map_err(|e| format!("cannot write {}: {e}", dot_path.display()))?;
    render(&dot_path)
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

//! Backprop, step by step, on BatchNorm composed from tape primitives: every node with its value
//! and its gradient in the order backward visits them, with the rule each op applies, then the
//! fused node's result beside it. First a constant upstream gradient, which gives `dx = 0`, then
//! an uneven one.
//!
//! ```sh
//! cargo run --release --example backprop_walkthrough
//! cargo run --release --example backprop_walkthrough -- --html out/backprop.html
//! ```
//!
//! With `--html FILE` it also writes two pages to step through in a browser (no network needed):
//! FILE, the constant-upstream example with the composed BatchNorm and the fused node side by
//! side on one tape, and `<FILE stem>_mlp_step.html` beside it, one training step of a small MLP
//! with BatchNorm.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use bnorm::walkthrough;
use clap::Parser;
use ndarray::{Array2, ArrayD, array};
use tape::{Gradients, Tape, Var};

/// Backprop step by step on BatchNorm, printed; with --html, as pages for a browser.
#[derive(Parser, Debug)]
struct Args {
    /// Also write the step-through pages: this file, and `<stem>_mlp_step.html` beside it.
    #[arg(long)]
    html: Option<PathBuf>,
}

/// What each primitive passes back to its inputs, in words (the chain rule, one op at a time).
fn rule(op: &str) -> &'static str {
    match op {
        "mean" => "spreads g evenly: each of the M inputs gets g / M",
        "sub" => "passes g to the left, -g to the right (summed over broadcast axes)",
        "mul" => "each side gets g times the other side (summed over broadcast axes)",
        "add_scalar" => "passes g through unchanged",
        "sqrt" => "g / (2 sqrt(v))",
        "div" => "g / b to the numerator, -g a / b^2 to the denominator",
        "reshape" => "reshapes g back to the input's shape",
        "add" => "passes g to both sides (summed over broadcast axes)",
        _ => "",
    }
}

/// An array on one line with 4 decimals.
fn line(a: &ArrayD<f64>) -> String {
    format!("{a:.4}").split_whitespace().collect::<Vec<_>>().join(" ")
}

fn walk(title: &str, x: Array2<f64>, dout: Array2<f64>) -> Result<(), layers::Error> {
    println!("\n=== {title}");
    println!("x = {}", line(&x.clone().into_dyn()));
    println!("gamma = [1, 1], beta = [0, 0], eps = 1e-5");
    println!("dout = {}", line(&dout.clone().into_dyn()));

    let tape = Tape::<f64>::new();
    let (vx, vgamma, vbeta) = (
        tape.var(x.clone()),
        tape.var(array![1.0, 1.0]),
        tape.var(array![0.0, 0.0]),
    );
    let names = HashMap::from([
        (vx.index(), "x"),
        (vgamma.index(), "gamma"),
        (vbeta.index(), "beta"),
    ]);
    let out = layers::batch_norm_composed(vx, vgamma, vbeta, 1e-5)?;
    let grads = out.backward_with(dout.clone())?;

    println!("\nBackward visits the nodes from the output back to the leaves:");
    for var in tape.vars().iter().rev() {
        print_node(var, &grads, &names);
    }

    // The fused node: one op, one hand-written backward, the same numbers.
    let fused_tape = Tape::<f64>::new();
    let (fx, fgamma, fbeta) = (
        fused_tape.var(x),
        fused_tape.var(array![1.0, 1.0]),
        fused_tape.var(array![0.0, 0.0]),
    );
    let fused = layers::batch_norm(fx, fgamma, fbeta, 1e-5)?;
    let fused_grads = fused.backward_with(dout)?;
    println!(
        "\nThe fused node ({} nodes on its tape instead of {}):",
        fused_tape.len(),
        tape.len()
    );
    for (name, composed, fused) in [
        (
            "out",
            out.value().as_ref().clone(),
            fused.value().as_ref().clone(),
        ),
        ("dx", grads.wrt(vx)?.clone(), fused_grads.wrt(fx)?.clone()),
        (
            "dgamma",
            grads.wrt(vgamma)?.clone(),
            fused_grads.wrt(fgamma)?.clone(),
        ),
        (
            "dbeta",
            grads.wrt(vbeta)?.clone(),
            fused_grads.wrt(fbeta)?.clone(),
        ),
    ] {
        let difference = (&composed - &fused).iter().fold(0.0f64, |m, d| m.max(d.abs()));
        println!("  {name:>6}: composed {}", line(&composed));
        println!("  {:>6}  fused    {}", "", line(&fused));
        println!("  {:>6}  |difference| <= {difference:.1e}", "");
    }
    Ok(())
}

/// One node: its index, what made it (a named leaf, or an op of earlier nodes), its value and
/// gradient, and the rule its backward applies.
fn print_node(var: &Var<'_, f64>, grads: &Gradients<f64>, names: &HashMap<usize, &str>) {
    let op = var.op_name();
    let what = match names.get(&var.index()) {
        Some(name) => format!("leaf {name}"),
        None if var.inputs().is_empty() => format!("{op} (a constant)"),
        None => format!("{op} of {:?}", var.inputs()),
    };
    let grad = grads.get(*var).map_or("(none: a constant)".to_string(), line);
    println!("  #{:<2} {what}", var.index());
    println!("      value {}", line(&var.value()));
    println!("      grad  {grad}");
    let explanation = rule(&op);
    if !explanation.is_empty() {
        println!("      backward: {explanation}");
    }
}

/// Writes `page` to `path`, creating its folder.
fn write_page(path: &Path, page: &str) -> Result<(), Box<dyn std::error::Error>> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
    }
    std::fs::write(path, page).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    println!("wrote {}", path.display());
    Ok(())
}

fn pages(path: &Path) -> Result<(), Box<dyn std::error::Error>> {
    write_page(path, &walkthrough::batch_norm_page()?.html)?;
    let stem = path
        .file_stem()
        .map_or("backprop".into(), |s| s.to_string_lossy().into_owned());
    let mlp = path.with_file_name(format!("{stem}_mlp_step.html"));
    write_page(&mlp, &walkthrough::mlp_step_page()?.html)
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let result = print_walkthrough()
        .map_err(Into::into)
        .and_then(|()| match &args.html {
            Some(path) => pages(path),
            None => Ok(()),
        });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn print_walkthrough() -> Result<(), layers::Error> {
    println!("BatchNorm, out = gamma * (x - mean) / sqrt(var + eps) + beta, per column.");
    println!("Composed from primitives, the tape derives every gradient by the chain rule.");

    walk(
        "A constant upstream gradient gives dx = 0 (x is 2 x 2, dout is all ones)",
        array![[1.0, 2.0], [3.0, 4.0]],
        Array2::ones((2, 2)),
    )?;
    for text in [
        "",
        "Why dx = 0 here: a constant upstream gradient asks to move every output of a column the",
        "same way, but the outputs of a column always have mean 0 and variance 1, so no change of x",
        "can do that. dbeta = column sums of dout = [2, 2]; dgamma = sum of dout * x_hat = [0, 0].",
        "More generally dx = 0 whenever a column of dout is a + b * x_hat (a shift and a rescaling of",
        "the outputs, which normalization undoes); with two rows every dout is.",
    ] {
        println!("{text}");
    }

    walk(
        "Three rows and an uneven upstream gradient: dx is not zero",
        array![[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]],
        array![[0.5, -1.0], [2.0, 0.75], [-0.3, 0.5]],
    )?;
    for text in [
        "",
        "Each column of dx still sums to 0. The fused backward computes it in one formula,",
        "  dx = gamma / std * (dout - mean(dout) - x_hat * mean(dout * x_hat)),",
        "derived in crates/layers/src/batch_norm/mod.rs.",
    ] {
        println!("{text}");
    }
    Ok(())
}

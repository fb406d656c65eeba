//! A tour of the tape: build a small graph, run it forward and backward, read gradients, and
//! check them against finite differences.
//!
//! ```sh
//! cargo run --release --example tape_tour
//! ```

use ndarray::array;
use tape::{GradCheck, Tape};

const USAGE: &str = "\
A tour of the tape: a one-layer net on two examples, forward, backward, and the gradient checker.

    loss = mean((tanh(x · W + b) - y)²)

with x (2 x 3) and y (2 x 2) constants, and W (3 x 2) and b (2) trainable. Prints the loss, the
gradients dL/dW and dL/db, the gradient checker's report and the graph in Graphviz DOT.

Usage: cargo run --release --example tape_tour [-- --help]";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    match std::env::args().nth(1).as_deref() {
        None => {}
        Some("-h" | "--help") => {
            println!("{USAGE}");
            return Ok(());
        }
        Some(other) => {
            eprintln!("error: unexpected argument {other:?}\n\n{USAGE}");
            std::process::exit(2);
        }
    }

    println!("loss = mean((tanh(x · W + b) - y)²), a one-layer net on two examples");
    let tape = Tape::<f64>::new();
    let x = tape.constant(array![[0.5, -1.0, 2.0], [1.5, 0.3, -0.7]]);
    let w = tape.var(array![[0.1, -0.2], [0.4, 0.3], [-0.5, 0.2]]);
    let b = tape.var(array![0.05, -0.05]); // broadcast over the rows
    let y = tape.constant(array![[1.0, 0.0], [0.0, 1.0]]);

    let hidden = x.matmul(w)?.try_add(b)?.tanh();
    let loss = (hidden - y).powi(2).mean();
    println!(
        "forward: {} nodes on the tape, loss = {:.6}",
        tape.len(),
        loss.scalar()
    );

    let grads = loss.backward()?;
    println!(
        "backward:\n  dL/dW =\n{:.6}\n  dL/db = {:.6}",
        grads.wrt(w)?,
        grads.wrt(b)?
    );
    println!(
        "  (x is a constant, so it has no gradient: {:?})",
        grads.get(x).map(|g| g.shape().to_vec())
    );

    // The same function, checked element by element against central differences.
    let inputs = [w.value().as_ref().clone(), b.value().as_ref().clone()];
    let (x_value, y_value) = (x.value(), y.value());
    let report = GradCheck::default().run(
        |t, v| {
            let x = t.constant(x_value.as_ref().clone());
            let y = t.constant(y_value.as_ref().clone());
            Ok((x.matmul(v[0])?.try_add(v[1])?.tanh() - y).powi(2).mean())
        },
        &inputs,
    )?;
    print!("{report}");

    println!(
        "\nThe graph in Graphviz DOT (render with `dot -Tsvg`):\n{}",
        tape.to_dot()
    );
    Ok(())
}

//! Second derivatives on the tape: Hessian-vector products and the full Hessian of a small net's
//! loss (with BatchNorm), each checked against finite differences of the gradient; then Newton's
//! method beside gradient descent on a small problem.
//!
//! ```sh
//! cargo run --release --example hessian
//! ```
//!
//! The net is `x → Linear(3, 4) → BatchNorm → tanh → Linear(4, 3) → softmax cross-entropy` on 16
//! rows, its 39 parameters one flat vector `θ` split into their shapes on the tape. The gradient
//! is recorded (`Tape::grad` with `create_graph`), so it can be differentiated again: `∂/∂θ ⟨∇L,
//! v⟩ = H v`. Row `i` of `H` is the gradient of `∇L[i]`. BatchNorm and the loss are fused nodes,
//! and their recorded backwards are fused nodes too, with hand-written double backwards; the
//! same Hessian through BatchNorm composed from primitives is computed beside it.
//!
//! Exits with an error if a check fails.

use std::error::Error;

use ndarray::{Array1, Array2, ArrayD, IxDyn};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand_distr::{Distribution, StandardNormal};
use tape::{GradOptions, Tape, Var};

/// The parameters' shapes, in the order of `θ`: W1, b1, gamma, beta, W2, b2.
const SHAPES: [&[usize]; 6] = [&[3, 4], &[4], &[4], &[4], &[4, 3], &[3]];
const ROWS: usize = 16;

type Result<T> = std::result::Result<T, Box<dyn Error>>;

fn normal(shape: &[usize], rng: &mut StdRng) -> ArrayD<f64> {
    ArrayD::from_shape_simple_fn(IxDyn(shape), || StandardNormal.sample(&mut *rng))
}

/// The data and the loss of the net at `θ`, on `θ`'s tape.
struct Problem {
    x: Array2<f64>,
    labels: Vec<usize>,
    /// Whether BatchNorm is the composition of primitives instead of the fused node.
    composed: bool,
}

impl Problem {
    fn loss<'t>(&self, theta: Var<'t, f64>) -> Result<Var<'t, f64>> {
        let tape = theta.tape();
        let shapes: Vec<Vec<usize>> = SHAPES.iter().map(|s| s.to_vec()).collect();
        let [w1, b1, gamma, beta, w2, b2] = theta.split(&shapes)?[..] else {
            unreachable!("six shapes, six parts")
        };
        let hidden = tape.constant(self.x.clone()).matmul(w1)?.try_add(b1)?;
        let normalize = if self.composed {
            layers::batch_norm_composed
        } else {
            layers::batch_norm
        };
        let hidden = normalize(hidden, gamma, beta, 1e-5)?.tanh();
        let logits = hidden.matmul(w2)?.try_add(b2)?;
        Ok(layers::softmax_cross_entropy(logits, &self.labels)?)
    }

    /// `∇L(θ)`, by one backward pass.
    fn gradient(&self, theta: &Array1<f64>) -> Result<Array1<f64>> {
        let tape = Tape::new();
        let t = tape.var(theta.clone());
        let grads = self.loss(t)?.backward()?;
        Ok(grads.wrt(t)?.clone().into_dimensionality()?)
    }

    /// `H v` by differentiating `⟨∇L, v⟩`.
    fn hvp(&self, theta: &Array1<f64>, v: &Array1<f64>) -> Result<Array1<f64>> {
        let tape = Tape::new();
        let (t, _, g) = recorded_gradient(&tape, theta, |t| self.loss(t))?;
        let s = g.try_mul(tape.constant(v.clone()))?.sum();
        Ok(s.backward()?.wrt(t)?.clone().into_dimensionality()?)
    }

    /// The full Hessian: the gradient recorded once, then one backward pass per row.
    fn hessian(&self, theta: &Array1<f64>) -> Result<Array2<f64>> {
        let tape = Tape::new();
        let (t, _, g) = recorded_gradient(&tape, theta, |t| self.loss(t))?;
        let p = theta.len();
        let mut h = Array2::zeros((p, p));
        for i in 0..p {
            let mut e = ArrayD::zeros(IxDyn(&[p]));
            e[i] = 1.0;
            let row = tape.backward_with(g, e)?;
            h.row_mut(i)
                .assign(&row.wrt(t)?.view().into_dimensionality::<ndarray::Ix1>()?);
        }
        Ok(h)
    }
}

/// `θ` as a variable on `tape`, `f(θ)`, and `∇f(θ)` recorded (`create_graph`), so that it can be
/// differentiated again.
fn recorded_gradient<'t>(
    tape: &'t Tape<f64>,
    theta: &Array1<f64>,
    f: impl FnOnce(Var<'t, f64>) -> Result<Var<'t, f64>>,
) -> Result<(Var<'t, f64>, Var<'t, f64>, Var<'t, f64>)> {
    let t = tape.var(theta.clone());
    let value = f(t)?;
    let options = GradOptions {
        create_graph: true,
        upstream: None,
    };
    let g = tape.grad(value, &[t], options)?[0].ok_or("the function depends on θ")?;
    Ok((t, value, g))
}

/// Central differences of the gradient along `v`, step `h`.
fn fd_hvp(problem: &Problem, theta: &Array1<f64>, v: &Array1<f64>, h: f64) -> Result<Array1<f64>> {
    let plus = problem.gradient(&(theta + &(v * h)))?;
    let minus = problem.gradient(&(theta - &(v * h)))?;
    Ok((plus - minus) / (2.0 * h))
}

fn max_abs<'a>(values: impl IntoIterator<Item = &'a f64>) -> f64 {
    values.into_iter().fold(0.0, |m, v| m.max(v.abs()))
}

fn check(what: &str, error: f64, tolerance: f64) -> Result<()> {
    let verdict = if error <= tolerance { "ok" } else { "FAILED" };
    println!("  {what:<58} {error:.2e}  (tolerance {tolerance:.0e}) {verdict}");
    if error <= tolerance {
        Ok(())
    } else {
        Err(format!("{what}: {error:.3e} exceeds {tolerance:.0e}").into())
    }
}

fn net_hessian() -> Result<()> {
    let rng = &mut StdRng::seed_from_u64(7);
    let x = normal(&[ROWS, 3], rng).into_dimensionality()?;
    let labels = (0..ROWS).map(|i| (i * 7 + 1) % 3).collect();
    let problem = Problem {
        x,
        labels,
        composed: false,
    };
    let p: usize = SHAPES.iter().map(|s| s.iter().product::<usize>()).sum();
    let mut theta: Array1<f64> = normal(&[p], rng).into_dimensionality()?;
    // gamma starts at 1 + noise, as a trained one would be near.
    theta
        .slice_mut(ndarray::s![16..20])
        .mapv_inplace(|v| 1.0 + 0.3 * v);

    println!(
        "Net: Linear(3, 4) -> BatchNorm -> tanh -> Linear(4, 3) -> softmax cross-entropy, {ROWS} rows, {p} parameters"
    );
    let tape = Tape::new();
    println!(
        "  loss at θ: {:.6}",
        problem.loss(tape.var(theta.clone()))?.scalar()
    );

    let v: Array1<f64> = normal(&[p], rng).into_dimensionality()?;
    let hv = problem.hvp(&theta, &v)?;
    let numeric = fd_hvp(&problem, &theta, &v, 1e-5)?;
    let scale = max_abs(&numeric).max(1.0);
    check(
        "H v against central differences of the gradient (rel.)",
        max_abs(&(&hv - &numeric)) / scale,
        1e-7,
    )?;

    let h = problem.hessian(&theta)?;
    let mut numeric = Array2::zeros((p, p));
    for i in 0..p {
        let mut e = Array1::zeros(p);
        e[i] = 1.0;
        numeric.column_mut(i).assign(&fd_hvp(&problem, &theta, &e, 1e-5)?);
    }
    let scale = max_abs(&numeric).max(1.0);
    check(
        "full Hessian against central differences (rel.)",
        max_abs(&(&h - &numeric)) / scale,
        1e-7,
    )?;
    check(
        "symmetry, max |H - Hᵀ| (rel.)",
        max_abs(&(&h - &h.t())) / scale,
        1e-12,
    )?;
    check(
        "rows by backward pass against H e_i by HVP (rel.)",
        {
            let e3 = Array1::from_shape_fn(p, |i| if i == 3 { 1.0 } else { 0.0 });
            max_abs(&(&h.row(3) - &problem.hvp(&theta, &e3)?)) / scale
        },
        1e-12,
    )?;
    let composed = Problem {
        composed: true,
        ..problem
    };
    let hc = composed.hessian(&theta)?;
    check(
        "fused double backwards against the composition (rel.)",
        max_abs(&(&h - &hc)) / scale,
        1e-10,
    )?;
    let diagonal: Vec<f64> = h.diag().to_vec();
    let (lo, hi) = diagonal
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &d| {
            (lo.min(d), hi.max(d))
        });
    println!(
        "  diagonal of H from {lo:.4} to {hi:.4}; trace {:.4}",
        diagonal.iter().sum::<f64>()
    );
    Ok(())
}

/// Rosenbrock's function `(1 - a)² + 100 (b - a²)²`, minimum 0 at (1, 1).
fn rosenbrock<'t>(theta: Var<'t, f64>) -> Result<Var<'t, f64>> {
    let tape = theta.tape();
    let [a, b] = theta.split(&[vec![], vec![]])?[..] else {
        unreachable!("two parts")
    };
    let first = tape.scalar(1.0).try_sub(a)?.powi(2);
    let second = b.try_sub(a.powi(2))?.powi(2).mul_scalar(100.0);
    Ok(first.try_add(second)?)
}

/// The value, gradient and Hessian (two backward passes of the recorded gradient) at `θ`.
fn derivatives(theta: [f64; 2]) -> Result<(f64, [f64; 2], [[f64; 2]; 2])> {
    let tape = Tape::new();
    let (t, f, g) = recorded_gradient(&tape, &ndarray::arr1(&theta), rosenbrock)?;
    let mut h = [[0.0; 2]; 2];
    for (i, row) in h.iter_mut().enumerate() {
        let e = ndarray::Array1::from_shape_fn(2, |j| if i == j { 1.0 } else { 0.0 });
        let grads = tape.backward_with(g, e)?;
        let r = grads.wrt(t)?;
        *row = [r[0], r[1]];
    }
    let gv = g.value();
    Ok((f.scalar(), [gv[0], gv[1]], h))
}

fn newton_beside_gradient_descent() -> Result<()> {
    println!("\nRosenbrock's function (1 - a)² + 100 (b - a²)² from (-1.2, 1); minimum 0 at (1, 1)");
    println!(
        "  {:>4}  {:>24}  {:>24}",
        "step", "Newton: f", "gradient descent (lr 1e-3): f"
    );
    let (mut newton, mut descent) = ([-1.2, 1.0], [-1.2, 1.0]);
    let mut steps_run = 0;
    for step in 0..=2000 {
        let (f_newton, g, h) = derivatives(newton)?;
        let (f_descent, gd, _) = derivatives(descent)?;
        if step <= 8 || [100, 1000, 2000].contains(&step) {
            println!("  {step:>4}  {f_newton:>24.6e}  {f_descent:>24.6e}");
        }
        // Newton: solve H d = -g (2×2, by Cramer's rule).
        let det = h[0][0] * h[1][1] - h[0][1] * h[1][0];
        if det.abs() > 0.0 && f_newton > 1e-30 {
            let d = [
                (-g[0] * h[1][1] + g[1] * h[0][1]) / det,
                (-g[1] * h[0][0] + g[0] * h[1][0]) / det,
            ];
            newton = [newton[0] + d[0], newton[1] + d[1]];
        }
        descent = [descent[0] - 1e-3 * gd[0], descent[1] - 1e-3 * gd[1]];
        steps_run = step;
    }
    let (f_newton, _, _) = derivatives(newton)?;
    let (f_descent, _, _) = derivatives(descent)?;
    println!(
        "  after {steps_run} steps: Newton at ({:.6}, {:.6}), gradient descent at ({:.4}, {:.4})",
        newton[0], newton[1], descent[0], descent[1]
    );
    check("Newton's f after the steps", f_newton, 1e-20)?;
    if f_descent <= f_newton {
        return Err("gradient descent should still be far from the minimum".into());
    }
    Ok(())
}

fn main() -> std::process::ExitCode {
    match net_hessian().and_then(|()| newton_beside_gradient_descent()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error}");
            std::process::ExitCode::FAILURE
        }
    }
}

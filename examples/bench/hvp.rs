//! The cost of a Hessian-vector product beside that of a gradient: BatchNorm (fused) on the
//! BatchNorm grid, and the main job's MLP with BatchNorm on a batch of digits-sized rows.
//!
//! A gradient pass is forward + backward. An HVP pass is forward, the backward recorded
//! ([`tape::Tape::grad`] with `create_graph`), `S = Σ ⟨gradient, v⟩` and its backward: the
//! product of the Hessian with `v`, for every input at once.

use std::hint::black_box;

use bnorm::models::{Norm, mlp};
use layers::{Module, batch_norm, softmax_cross_entropy};
use ndarray::{Array1, ArrayD};
use rand::SeedableRng;
use rand::rngs::StdRng;
use tape::{Element, GradOptions, Tape, Var};

use crate::{Budget, medians_us, normal};

/// Rows of the MLP's batch (the main job's batch size) and its input features.
const MLP_BATCH: usize = 60;
const MLP_FEATURES: usize = 64;

fn recorded<T>() -> GradOptions<T> {
    GradOptions {
        create_graph: true,
        upstream: None,
    }
}

fn valid<V, E: std::fmt::Display>(result: Result<V, E>) -> V {
    result.unwrap_or_else(|e| panic!("benchmark inputs are valid: {e}"))
}

/// `Σ ⟨grads, directions⟩`, then its backward; returns the bytes the tape kept before that
/// backward.
fn hessian_times<'t, T: Element>(
    tape: &'t Tape<T>,
    loss: Var<'t, T>,
    wrt: &[Var<'t, T>],
    directions: &[ArrayD<T>],
) -> usize {
    let grads = valid(tape.grad(loss, wrt, recorded()));
    let mut s = tape.scalar(T::zero());
    for (g, v) in grads.iter().zip(directions) {
        let g = g.unwrap_or_else(|| panic!("every input reaches the loss"));
        s = s + valid(g.try_mul(tape.constant(v.clone()))).sum();
    }
    let saved = tape.saved_bytes();
    let hvp = valid(s.backward());
    black_box(
        wrt.iter()
            .filter_map(|&v| hvp.get(v))
            .map(|g| g.len())
            .sum::<usize>(),
    );
    saved
}

/// BatchNorm: `L = Σ dout · BN(x)` differentiated once (`hvp` false) or twice.
fn bn_pass<T: Element>(
    hvp: bool,
    inputs: &(ArrayD<T>, Array1<T>, Array1<T>, ArrayD<T>),
    v: &[ArrayD<T>],
) -> usize {
    let (x, gamma, beta, dout) = inputs;
    let tape = Tape::new();
    let (x, gamma, beta) = (
        tape.var(x.clone()),
        tape.var(gamma.clone()),
        tape.var(beta.clone()),
    );
    let y = valid(batch_norm(x, gamma, beta, 1e-5));
    let loss = valid(y.try_mul(tape.constant(dout.clone()))).sum();
    if hvp {
        return hessian_times(&tape, loss, &[x, gamma, beta], v);
    }
    let saved = tape.saved_bytes();
    black_box(valid(loss.backward()).get(x).map(|g| g.len()));
    saved
}

/// The MLP (`64 → (Linear → BatchNorm → Sigmoid) × 3 → Linear → 10`) on one batch: softmax
/// cross-entropy differentiated once with respect to every parameter, or twice along `v`.
fn mlp_pass<T: Element>(
    hvp: bool,
    net: &mut layers::Sequential<T>,
    x: &ArrayD<T>,
    labels: &[usize],
    v: &[ArrayD<T>],
) -> usize {
    let tape = Tape::new();
    let params: Vec<Var<'_, T>> = net.parameters().iter().map(|p| p.bind(&tape)).collect();
    let logits = valid(net.forward(tape.constant(x.clone()), layers::Mode::Train));
    let loss = valid(softmax_cross_entropy(logits, labels));
    if hvp {
        return hessian_times(&tape, loss, &params, v);
    }
    let saved = tape.saved_bytes();
    black_box(valid(loss.backward()).get(params[0]).map(|g| g.len()));
    saved
}

fn line(case: &str, dtype: &str, grad: (f64, usize), hvp: (f64, usize)) -> String {
    eprintln!(
        "{dtype:>4} hvp {case:<18} gradient {:>10.1} us   hvp {:>10.1} us   ratio {:>5.2}   saved bytes {} vs {}",
        grad.0,
        hvp.0,
        hvp.0 / grad.0,
        grad.1,
        hvp.1
    );
    format!(
        "{{\"op\": \"hvp\", \"dtype\": \"{dtype}\", \"case\": \"{case}\", \"gradient_us\": {:.1}, \"hvp_us\": {:.1}, \"ratio\": {:.3}, \
         \"gradient_saved_bytes\": {}, \"hvp_saved_bytes\": {}}}",
        grad.0,
        hvp.0,
        hvp.0 / grad.0,
        grad.1,
        hvp.1
    )
}

/// BatchNorm of `shape`, gradient against HVP.
pub(crate) fn bn_case<T: Element>(shape: &[usize], budget: Budget) -> String {
    let mut rng = StdRng::seed_from_u64(0);
    let c = shape[1];
    let inputs = (
        normal::<T>(shape, &mut rng),
        Array1::<T>::ones(c),
        Array1::<T>::zeros(c),
        normal::<T>(shape, &mut rng),
    );
    let v = [
        normal::<T>(shape, &mut rng),
        normal::<T>(&[c], &mut rng),
        normal::<T>(&[c], &mut rng),
    ];
    let saved = (bn_pass(false, &inputs, &v), bn_pass(true, &inputs, &v));
    let mut hvp = |()| {
        bn_pass(true, &inputs, &v);
    };
    let (grad_us, hvp_us) = medians_us(
        budget,
        || (),
        |()| {
            bn_pass(false, &inputs, &v);
        },
        Some(&mut hvp),
    );
    let case = format!("batch_norm {shape:?}").replace(' ', "");
    line(
        &case,
        T::NAME,
        (grad_us, saved.0),
        (hvp_us.unwrap_or(f64::NAN), saved.1),
    )
}

/// The MLP with BatchNorm, gradient against HVP.
pub(crate) fn mlp_case<T: Element>(budget: Budget) -> String {
    let mut rng = StdRng::seed_from_u64(0);
    let mut net = mlp::<T>(Norm::Batch, 0);
    let x = normal::<T>(&[MLP_BATCH, MLP_FEATURES], &mut rng);
    let labels: Vec<usize> = (0..MLP_BATCH).map(|i| i % 10).collect();
    let v: Vec<ArrayD<T>> = net
        .parameters()
        .iter()
        .map(|p| normal::<T>(p.value.shape(), &mut rng))
        .collect();
    let saved = (
        mlp_pass(false, &mut net, &x, &labels, &v),
        mlp_pass(true, &mut net, &x, &labels, &v),
    );
    let net = std::cell::RefCell::new(net);
    let mut hvp = |()| {
        mlp_pass(true, &mut net.borrow_mut(), &x, &labels, &v);
    };
    let (grad_us, hvp_us) = medians_us(
        budget,
        || (),
        |()| {
            mlp_pass(false, &mut net.borrow_mut(), &x, &labels, &v);
        },
        Some(&mut hvp),
    );
    let case = format!("mlp_bn[{MLP_BATCH},{MLP_FEATURES}]");
    line(
        &case,
        T::NAME,
        (grad_us, saved.0),
        (hvp_us.unwrap_or(f64::NAN), saved.1),
    )
}

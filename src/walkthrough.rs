//! The two step-through pages of `examples/backprop_walkthrough --html` (see
//! [`tape::html`]): BatchNorm composed from primitives beside the fused node, and one training
//! step of a small MLP with BatchNorm. Each page comes with the tape's gradient of every
//! trainable leaf, which the browser test compares with what the page shows.

use ndarray::{ArrayD, IxDyn, array};
use rand::{Rng, SeedableRng};
use tape::html::{HtmlOptions, finite_differences};
use tape::{Result, Tape, TapeError, Var, VarId};

/// A page and what it must show.
#[derive(Debug, Clone)]
pub struct Page {
    /// The self-contained HTML.
    pub html: String,
    /// Each trainable leaf's name and the tape's gradient of the loss with respect to it.
    pub leaves: Vec<(String, Vec<f64>)>,
}

/// The step of the finite differences on the pages.
const STEP: f64 = 1e-6;

fn as_tape(error: layers::Error) -> TapeError {
    match error {
        layers::Error::Tape(inner) => inner,
        other => TapeError::op("layers", other),
    }
}

/// The composed BatchNorm plus the fused one, of the same `x`, `gamma`, `beta`.
fn both<'t>(v: &[Var<'t, f64>]) -> Result<Var<'t, f64>> {
    let composed = layers::batch_norm_composed(v[0], v[1], v[2], 1e-5).map_err(as_tape)?;
    let fused = layers::batch_norm(v[0], v[1], v[2], 1e-5).map_err(as_tape)?;
    composed.try_add(fused)
}

/// The MLP's loss on the rows `x` with parameters `v` (W1, b1, gamma, beta, W2).
fn mlp_loss<'t>(x: &ArrayD<f64>, v: &[Var<'t, f64>]) -> Result<Var<'t, f64>> {
    let labels = [0, 2, 1, 1, 0, 2];
    let hidden = v[0].tape().constant(x.clone()).matmul(v[0])?.try_add(v[1])?;
    let normalized = layers::batch_norm(hidden, v[2], v[3], 1e-5).map_err(as_tape)?;
    let logits = normalized.tanh().matmul(v[4])?;
    layers::softmax_cross_entropy(logits, &labels).map_err(as_tape)
}

/// The page of `loss` (with upstream `upstream`) on `tape`, its leaves named, with their
/// gradients beside finite differences of `f`, which recomputes `loss` from the leaves.
fn page<'t>(
    (tape, loss, upstream): (&'t Tape<f64>, Var<'t, f64>, ArrayD<f64>),
    leaves: &[(Var<'t, f64>, &str)],
    f: impl for<'s> FnMut(&'s Tape<f64>, &[Var<'s, f64>]) -> Result<Var<'s, f64>>,
    (title, description): (&str, String),
) -> Result<Page> {
    let values: Vec<ArrayD<f64>> = leaves.iter().map(|(v, _)| v.value().as_ref().clone()).collect();
    let numeric = finite_differences(f, &values, &upstream, STEP)?;
    let ids: Vec<VarId> = leaves.iter().map(|(v, _)| v.id()).collect();
    let options = HtmlOptions {
        title: title.into(),
        description,
        names: ids
            .iter()
            .zip(leaves)
            .map(|(&id, (_, name))| (id, name.to_string()))
            .collect(),
        finite_differences: ids.iter().copied().zip(numeric).collect(),
    };
    let html = tape.to_html(loss, upstream.clone(), &options)?;
    let grads = tape.backward_with(loss, upstream)?;
    let leaves = leaves
        .iter()
        .map(|(v, name)| Ok((name.to_string(), grads.wrt(*v)?.iter().copied().collect())))
        .collect::<Result<_>>()?;
    Ok(Page { html, leaves })
}

/// BatchNorm composed from primitives and the fused node on one tape, their outputs added, with
/// a constant upstream gradient: `x`, `gamma` and `beta` each feed both, so the page shows one
/// contribution from each side (and `dx = 0` through either).
///
/// # Errors
/// None for these fixed inputs; the signature carries the tape's.
pub fn batch_norm_page() -> Result<Page> {
    let tape = Tape::<f64>::new();
    let x = tape.var(array![[1.0, 2.0], [3.0, 4.0]]);
    let (gamma, beta) = (tape.var(array![1.0, 1.0]), tape.var(array![0.0, 0.0]));
    let out = both(&[x, gamma, beta])?;
    let upstream = ArrayD::<f64>::ones(out.shape());
    let description = "out = composed(x) + fused(x), BatchNorm from primitives beside the one fused node, \
        with a constant upstream gradient (all ones), so dx = 0 through either. Step forward through \
        the primitives and the fused node, then backward: x, gamma and beta each receive one \
        contribution from each side, and the two are equal."
        .to_string();
    page(
        (&tape, out, upstream),
        &[(x, "x"), (gamma, "gamma"), (beta, "beta")],
        |_, v| both(v),
        (
            "BatchNorm: composed from primitives beside the fused node",
            description,
        ),
    )
}

/// One training step of `x → Linear(3, 4) → BatchNorm → tanh → Linear(4, 3) → softmax
/// cross-entropy` on 6 rows: the forward pass, the backward pass, every parameter's gradient.
///
/// # Errors
/// None for these fixed inputs; the signature carries the tape's.
pub fn mlp_step_page() -> Result<Page> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let mut uniform = |shape: &[usize], scale: f64| {
        ArrayD::from_shape_simple_fn(IxDyn(shape), || scale * rng.random_range(-1.0..1.0))
    };
    let x = uniform(&[6, 3], 2.0);
    let tape = Tape::<f64>::new();
    let params = [
        tape.var(uniform(&[3, 4], 0.8)),
        tape.var(ArrayD::zeros(IxDyn(&[4]))),
        tape.var(ArrayD::ones(IxDyn(&[4]))),
        tape.var(ArrayD::zeros(IxDyn(&[4]))),
        tape.var(uniform(&[4, 3], 0.8)),
    ];
    let loss = mlp_loss(&x, &params)?;
    let description = format!(
        "x (6 x 3) -> Linear(3, 4) -> BatchNorm (one fused node) -> tanh -> Linear(4, 3) -> softmax \
         cross-entropy (one fused node); loss {:.6}. The backward pass gives every parameter's \
         gradient, and SGD then moves each parameter against it. b1's gradient is 0: BatchNorm \
         removes any shift of its input.",
        loss.scalar()
    );
    let names = ["W1", "b1", "gamma", "beta", "W2"];
    let leaves: Vec<(Var<'_, f64>, &str)> = params.iter().copied().zip(names).collect();
    page(
        (&tape, loss, ndarray::arr0(1.0).into_dyn()),
        &leaves,
        |_, v| mlp_loss(&x, v),
        ("One training step of a small MLP with BatchNorm", description),
    )
}

//! The `double_backward` kind: BatchNorm differentiated twice. The first-order gradients are
//! recorded on the tape ([`Tape::grad`] with `create_graph`), then differentiated again along
//! the file's directions: through the fused node, whose recorded backward is one fused node
//! with the hand-written double backward, and through BatchNorm composed from primitives
//! (results prefixed `composed.`). The composition computes in `T`, and in `f32` two values per
//! channel leave `dx` mostly cancellation, so in `f32` only the fused node is checked.

use layers::{batch_norm, batch_norm_composed, batch_norm_eval};
use tape::{Element, GradOptions, Tape, Var};

use super::{Errors, GoldenError, Obj, Tensor, format_error, gradient_or_empty, relative_error};

/// BatchNorm's second derivatives: inputs, directions and PyTorch's results.
#[derive(Debug, Clone)]
pub struct DoubleBackwardCase {
    /// Inputs `x`, `gamma`, `beta` and the upstream gradient `dout`.
    pub inputs: [Tensor; 4],
    /// Directions `v_x`, `v_gamma`, `v_beta` of the second differentiation.
    pub directions: [Tensor; 3],
    /// `None` in training (batch statistics), else the running mean and variance.
    pub running: Option<(Tensor, Tensor)>,
    /// The `eps`.
    pub eps: f64,
    /// Expected `dx`, `dgamma`, `dbeta`, then `d_x`, `d_gamma`, `d_dout`.
    pub expected: Vec<(&'static str, Tensor)>,
}

pub(super) fn parse_double_backward(case: &Obj<'_>) -> Result<DoubleBackwardCase, GoldenError> {
    let training = case
        .field("training")?
        .as_bool()
        .ok_or_else(|| format_error(format!("{}.training", case.at), "expected true or false"))?;
    let running = if training {
        None
    } else {
        Some((case.tensor("running_mean")?, case.tensor("running_var")?))
    };
    let tensor = |key| case.tensor(key);
    Ok(DoubleBackwardCase {
        inputs: [tensor("x")?, tensor("gamma")?, tensor("beta")?, tensor("dout")?],
        directions: [tensor("v_x")?, tensor("v_gamma")?, tensor("v_beta")?],
        running,
        eps: case.number("eps")?,
        expected: case.tensors(&["dx", "dgamma", "dbeta", "d_x", "d_gamma", "d_dout"])?,
    })
}

/// BatchNorm from primitives with given statistics as constants: `(x - mean) / sqrt(var + eps)
/// · gamma + beta`, statistics per channel on axis 1.
fn with_running<'t, T: Element>(
    (x, gamma, beta): (Var<'t, T>, Var<'t, T>, Var<'t, T>),
    (mean, var): (&Tensor, &Tensor),
    eps: f64,
) -> layers::Result<Var<'t, T>> {
    let tape = x.tape();
    let mut channel = vec![1; x.shape().len()];
    channel[1] = mean.data.len();
    let constant = |t: &Tensor| tape.constant(t.to_array::<T>()).reshape(&channel);
    let std = constant(var)?.add_scalar(T::from_f64_lossy(eps)).sqrt();
    let normalized = x.try_sub(constant(mean)?)?.try_div(std)?;
    Ok(normalized
        .try_mul(gamma.reshape(&channel)?)?
        .try_add(beta.reshape(&channel)?)?)
}

pub(super) fn check_double_backward<T: Element>(case: &DoubleBackwardCase) -> layers::Result<Errors> {
    let forms: &[bool] = if std::mem::size_of::<T>() < 8 {
        &[false]
    } else {
        &[false, true]
    };
    let mut errors = Errors::new();
    for &composed in forms {
        let results = second_derivatives::<T>(case, composed)?;
        let prefix = if composed { "composed." } else { "" };
        errors.extend(
            case.expected
                .iter()
                .zip(&results)
                .map(|((name, reference), ours)| {
                    (format!("{prefix}{name}"), relative_error(ours, reference))
                }),
        );
    }
    Ok(errors)
}

/// `dx, dgamma, dbeta` of `Σ dout · BN(x)`, then the gradients of `Σ v · (dx, dgamma, dbeta)`
/// with respect to `x`, `gamma` and `dout`: through the fused node or the composition.
fn second_derivatives<T: Element>(
    case: &DoubleBackwardCase,
    composed: bool,
) -> layers::Result<Vec<ndarray::ArrayD<T>>> {
    let tape = Tape::new();
    let [x, gamma, beta, dout] = case.inputs.each_ref().map(|t| tape.var(t.to_array::<T>()));
    let out = match (&case.running, composed) {
        (None, false) => batch_norm(x, gamma, beta, case.eps)?,
        (None, true) => batch_norm_composed(x, gamma, beta, case.eps)?,
        (Some((mean, var)), false) => {
            let channel = |t: &Tensor| t.to_array::<T>().into_iter().collect::<ndarray::Array1<T>>();
            batch_norm_eval(x, gamma, beta, &channel(mean), &channel(var), case.eps)?
        }
        (Some((mean, var)), true) => with_running((x, gamma, beta), (mean, var), case.eps)?,
    };
    let recorded = GradOptions {
        create_graph: true,
        upstream: None,
    };
    let first = tape.grad(out.try_mul(dout)?.sum(), &[x, gamma, beta], recorded)?;
    let mut s = tape.scalar(T::zero());
    let mut results = Vec::new();
    for (g, v) in first.iter().zip(&case.directions) {
        let g = g.unwrap_or_else(|| tape.constant(ndarray::ArrayD::zeros(v.shape.clone())));
        results.push(g.value().as_ref().clone());
        s = s.try_add(g.try_mul(tape.constant(v.to_array::<T>()))?.sum())?;
    }
    let second = s.backward()?;
    results.extend([x, gamma, dout].map(|v| gradient_or_empty(second.get(v))));
    Ok(results)
}

//! BatchNorm on the tape, two ways: [`batch_norm`] records ONE fused node whose backward is the
//! closed form of the [module docs](super); [`batch_norm_composed`] records the same computation
//! as tape primitives, so the tape derives its gradient. Tests check that the two agree.

use ndarray::{Array1, ArrayD, ArrayViewD};
use tape::{BackwardArgs, Element, Function, GraphArgs, TapeError, Var};

use super::double::BatchNormBackward;
use super::kernel::{self, Dims, Saved};
use super::{check_channels, check_training_inputs, dims_of, from_f64, row_major, shaped, to_f64};
use crate::error::{Error, Result, check_non_negative};

/// The fused BatchNorm node: inputs `x`, `gamma`, `beta`; saved state only the per-channel mean
/// and inverse standard deviation (`C` values of `f64` each).
///
/// Made by [`batch_norm`] (batch statistics, training mode) or by the
/// [`BatchNorm`](crate::BatchNorm) layer (which also makes evaluation-mode nodes from its running
/// statistics). Implemented with the tape's public custom-op API, [`tape::Function`].
#[derive(Debug, Clone)]
pub struct BatchNormNode<T> {
    mean: Vec<f64>,
    inv_std: Vec<f64>,
    /// True when `mean` and `inv_std` are the batch's own statistics (so `x` reaches the output
    /// through them too), false for evaluation with running statistics.
    batch_stats: bool,
    /// The output, when it was computed together with the statistics (training): `forward`
    /// hands it to the tape instead of computing it again.
    output: Option<Vec<T>>,
}

impl<T: Element> BatchNormNode<T> {
    /// A node normalizing with the given per-channel statistics. `batch_stats` says whether they
    /// are `x`'s own (training: the backward includes the paths through them) or constants.
    pub(crate) fn new(mean: Vec<f64>, inv_std: Vec<f64>, batch_stats: bool) -> Self {
        BatchNormNode {
            mean,
            inv_std,
            batch_stats,
            output: None,
        }
    }

    /// A training-mode node for input `x` (row-major, checked to be `dims`) with parameters
    /// `gamma` and `beta`, which the node must then be applied to; and the batch statistics.
    /// The statistics and the output are computed together, here.
    pub(crate) fn training(
        x: &[T],
        dims: Dims,
        gamma: &[f64],
        beta: &[f64],
        eps: f64,
    ) -> (Self, kernel::Stats) {
        let (stats, inv_std, out) = kernel::forward_batch(x, dims, gamma, beta, eps);
        let node = BatchNormNode {
            output: Some(out),
            ..Self::new(stats.mean.clone(), inv_std, true)
        };
        (node, stats)
    }

    /// An evaluation-mode node: normalizes with running statistics, constants for backward.
    pub(crate) fn from_running(running_mean: &Array1<T>, running_var: &Array1<T>, eps: f64) -> Self {
        let inv_std = kernel::inv_std(&to_f64(running_var), eps);
        Self::new(to_f64(running_mean), inv_std, false)
    }

    fn check(&self, x: &[usize], gamma: &[usize], beta: &[usize]) -> Result<Dims> {
        let dims = dims_of(x)?;
        check_channels("gamma", gamma, dims.c)?;
        check_channels("beta", beta, dims.c)?;
        if self.mean.len() != dims.c {
            return Err(Error::Length {
                name: "mean",
                got: self.mean.len(),
                expected: dims.c,
                of: "channels of x",
            });
        }
        Ok(dims)
    }
}

fn as_tape_error(error: Error) -> TapeError {
    match error {
        Error::Tape(inner) => inner,
        other => TapeError::op("batch_norm", other),
    }
}

impl<T: Element> Function<T> for BatchNormNode<T> {
    fn name(&self) -> &str {
        "batch_norm"
    }

    fn rule(&self) -> &str {
        if self.batch_stats {
            "batch_norm (fused): ∂/∂x = γ r [g - mean(g) - x̂ mean(g x̂)], ∂/∂γ = Σ g x̂, ∂/∂β = Σ g"
        } else {
            "batch_norm (fused, running statistics): ∂/∂x = γ r g, ∂/∂γ = Σ g x̂, ∂/∂β = Σ g"
        }
    }

    fn forward(&mut self, inputs: &[ArrayViewD<'_, T>]) -> tape::Result<ArrayD<T>> {
        let [x, gamma, beta] = inputs else {
            return Err(TapeError::op(
                "batch_norm",
                format!("takes 3 inputs (x, gamma, beta), got {}", inputs.len()),
            ));
        };
        let dims = self
            .check(x.shape(), gamma.shape(), beta.shape())
            .map_err(as_tape_error)?;
        let out = match self.output.take() {
            Some(out) if out.len() == x.len() => out,
            Some(out) => {
                return Err(TapeError::op(
                    "batch_norm",
                    format!("the node's output has {} values, x has {}", out.len(), x.len()),
                ));
            }
            None => {
                let (gamma, beta) = (to_f64(gamma), to_f64(beta));
                kernel::forward_with(&row_major(x), dims, &gamma, &beta, &self.mean, &self.inv_std)
            }
        };
        Ok(shaped(out, x.raw_dim()))
    }

    fn backward(&self, args: &BackwardArgs<'_, T>) -> tape::Result<Vec<Option<ArrayD<T>>>> {
        let [x, gamma, _] = args.inputs else {
            return Err(TapeError::op("batch_norm", "backward takes the 3 forward inputs"));
        };
        let saved = Saved {
            gamma: &to_f64(gamma),
            mean: &self.mean,
            inv_std: &self.inv_std,
            batch_stats: self.batch_stats,
        };
        let dims = Dims::of(x.shape());
        let (dout, x_values) = (row_major(&args.grad_output), row_major(x));
        let grads = kernel::backward(&dout, &x_values, dims, saved, args.needs_grad[0]);
        let channel = |values: &[f64]| from_f64::<T>(values).into_dyn();
        Ok(vec![
            grads.dx.map(|dx| shaped(dx, x.raw_dim())),
            args.needs_grad[1].then(|| channel(&grads.dgamma)),
            args.needs_grad[2].then(|| channel(&grads.dbeta)),
        ])
    }

    /// One fused node, `batch_norm_backward`, whose own backward is the closed-form double
    /// backward (see the [module docs](super#the-double-backward)).
    fn backward_graph<'t>(&self, args: &GraphArgs<'_, 't, T>) -> tape::Result<Vec<Option<Var<'t, T>>>> {
        let node = BatchNormBackward {
            mean: self.mean.clone(),
            inv_std: self.inv_std.clone(),
            batch_stats: self.batch_stats,
        };
        node.record(args)
    }

    fn saved_bytes(&self) -> usize {
        (self.mean.len() + self.inv_std.len()) * std::mem::size_of::<f64>()
    }
}

/// Training-mode BatchNorm as ONE fused tape node with a hand-written backward (see the
/// [module docs](super) for the derivation).
///
/// # Shapes
/// `x`: `(N, C, *)`, rank 2 to 5; `gamma`, `beta`: `(C,)`; the result: as `x`.
///
/// # Errors
/// As [`batchnorm_forward`](super::batchnorm_forward), and [`Error::Tape`] for a `Var` of
/// another tape.
///
/// # Example
/// ```
/// use ndarray::{array, Array2};
/// use tape::Tape;
///
/// let tape = Tape::<f64>::new();
/// let x = tape.var(array![[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]);
/// let gamma = tape.var(array![1.0, 1.0]);
/// let beta = tape.var(array![0.0, 0.0]);
/// let y = layers::batch_norm(x, gamma, beta, 1e-5)?;
/// let grads = y.backward_with(array![[0.1, -0.4], [0.7, 0.2], [-0.3, 0.9]])?;
/// assert_eq!(grads.wrt(x)?.shape(), &[3, 2]);
/// # Ok::<(), layers::Error>(())
/// ```
pub fn batch_norm<'t, T: Element>(
    x: Var<'t, T>,
    gamma: Var<'t, T>,
    beta: Var<'t, T>,
    eps: f64,
) -> Result<Var<'t, T>> {
    let (value, gamma_value, beta_value) = (x.value(), gamma.value(), beta.value());
    let dims = check_training_inputs(value.shape(), gamma_value.shape(), beta_value.shape(), eps)?;
    let (gamma_f64, beta_f64) = (to_f64(&gamma_value), to_f64(&beta_value));
    let (node, _) = BatchNormNode::training(&row_major(&value), dims, &gamma_f64, &beta_f64, eps);
    Ok(x.tape().apply(node, &[x, gamma, beta])?)
}

/// Evaluation-mode BatchNorm as ONE fused node: normalizes with the given running mean and
/// (unbiased) variance, which are constants, as PyTorch's `F.batch_norm(x, running_mean,
/// running_var, gamma, beta, training=False, eps=eps)`. The [`BatchNorm`](crate::BatchNorm)
/// layer in [`Mode::Eval`](crate::Mode::Eval) records the same node.
///
/// # Shapes
/// As [`batch_norm`]; `running_mean`, `running_var`: `(C,)`.
///
/// # Errors
/// [`Error::InvalidSetting`] for a negative or non-finite `eps`, [`Error::Shape`] or
/// [`Error::Length`] for a rank other than 2 to 5 or per-channel arguments that do not have one
/// value per channel, and [`Error::Tape`] for a `Var` of another tape.
///
/// # Example
/// ```
/// use ndarray::array;
/// use tape::Tape;
///
/// let tape = Tape::<f64>::new();
/// let x = tape.var(array![[1.0, 2.0], [3.0, 4.0]]);
/// let (gamma, beta) = (tape.var(array![2.0, 1.0]), tape.var(array![0.5, 0.0]));
/// let y = layers::batch_norm_eval(x, gamma, beta, &array![1.0, 2.0], &array![4.0, 1.0], 0.0)?;
/// // (x - mean) / sqrt(var) · gamma + beta, column by column.
/// assert_eq!(y.value().as_ref(), &array![[0.5, 0.0], [2.5, 2.0]].into_dyn());
/// # Ok::<(), layers::Error>(())
/// ```
pub fn batch_norm_eval<'t, T: Element>(
    x: Var<'t, T>,
    gamma: Var<'t, T>,
    beta: Var<'t, T>,
    running_mean: &Array1<T>,
    running_var: &Array1<T>,
    eps: f64,
) -> Result<Var<'t, T>> {
    check_non_negative("eps", eps)?;
    let dims = dims_of(&x.shape())?;
    check_channels("gamma", &gamma.shape(), dims.c)?;
    check_channels("beta", &beta.shape(), dims.c)?;
    check_channels("running_mean", running_mean.shape(), dims.c)?;
    check_channels("running_var", running_var.shape(), dims.c)?;
    let node = BatchNormNode::from_running(running_mean, running_var, eps);
    Ok(x.tape().apply(node, &[x, gamma, beta])?)
}

/// Training-mode BatchNorm composed from tape primitives only (mean, sub, mul, add eps, sqrt,
/// div, scale, shift): the tape derives its gradient, step by step. Slower and heavier than
/// [`batch_norm`], and computed in `T` (no `f64` accumulation); it exists to check the fused
/// node against and to show the chain rule at work.
///
/// # Shapes
/// As [`batch_norm`].
///
/// # Errors
/// As [`batch_norm`].
pub fn batch_norm_composed<'t, T: Element>(
    x: Var<'t, T>,
    gamma: Var<'t, T>,
    beta: Var<'t, T>,
    eps: f64,
) -> Result<Var<'t, T>> {
    let shape = x.shape();
    let dims = check_training_inputs(&shape, &gamma.shape(), &beta.shape(), eps)?;
    // Statistics over every axis but the channel; keep-dims so they broadcast against x.
    let axes: Vec<usize> = (0..shape.len()).filter(|&axis| axis != 1).collect();
    let mut channel_shape = vec![1; shape.len()];
    channel_shape[1] = dims.c;

    let mean = x.mean_axes(&axes, true)?;
    let centred = x.try_sub(mean)?;
    let var = centred.try_mul(centred)?.mean_axes(&axes, true)?;
    let std = var.add_scalar(T::from_f64_lossy(eps)).sqrt();
    let x_hat = centred.try_div(std)?;
    let scaled = x_hat.try_mul(gamma.reshape(&channel_shape)?)?;
    Ok(scaled.try_add(beta.reshape(&channel_shape)?)?)
}

#[cfg(test)]
mod tests {
    use ndarray::{Array1, ArrayD, array};
    use tape::{GradCheck, Tape, Var, check_gradients};

    use super::*;
    use crate::batch_norm::testing::{channel, normal};

    #[test]
    fn fused_and_composed_pass_the_gradient_checker() {
        for shape in [&[5, 3][..], &[3, 2, 4], &[2, 3, 2, 2]] {
            let c = shape[1];
            let inputs = [
                normal(shape, 0.5, 2.0, 1),
                channel(c, 1.0, 2).into_dyn(),
                channel(c, 0.0, 3).into_dyn(),
            ];
            let fused = check_gradients(|_, v| Ok(batch_norm(v[0], v[1], v[2], 1e-5)?), &inputs).unwrap();
            let composed =
                check_gradients(|_, v| Ok(batch_norm_composed(v[0], v[1], v[2], 1e-5)?), &inputs).unwrap();
            assert_eq!(fused.checked, composed.checked);
        }
    }

    #[test]
    fn evaluation_nodes_pass_the_gradient_checker() {
        // Running statistics are constants: dx = gamma · inv_std · dout, exactly.
        let (mean, inv_std) = (vec![0.3, -1.0, 2.0], vec![0.5, 2.0, 1.25]);
        let inputs = [
            normal(&[4, 3, 2], 0.0, 1.0, 4),
            channel(3, 1.0, 5).into_dyn(),
            channel(3, 0.0, 6).into_dyn(),
        ];
        let node = BatchNormNode::new(mean, inv_std, false);
        check_gradients(|t, v| t.apply(node.clone(), v), &inputs).unwrap();
        // The training formula would be wrong here: the checker sees the difference.
        let wrong = BatchNormNode {
            batch_stats: true,
            ..node.clone()
        };
        assert!(
            GradCheck::default()
                .run(|t, v| t.apply(wrong.clone(), v), &inputs)
                .is_err()
        );
    }

    #[test]
    fn the_fused_node_saves_only_per_channel_statistics() {
        let tape = Tape::<f32>::new();
        let x = tape.var(
            Array1::<f32>::linspace(0.0, 1.0, 256 * 16)
                .into_shape_with_order((256, 16))
                .unwrap(),
        );
        let (gamma, beta) = (
            tape.var(Array1::<f32>::ones(16)),
            tape.var(Array1::<f32>::zeros(16)),
        );
        let before = tape.saved_bytes();
        let _ = batch_norm(x, gamma, beta, 1e-5).unwrap();
        let fused = tape.saved_bytes() - before;
        // The output (which the tape keeps for any node) plus the mean and inv_std in f64.
        assert_eq!(fused, 256 * 16 * 4 + 16 * 8 + 16 * 8);
        let before = tape.saved_bytes();
        let _ = batch_norm_composed(x, gamma, beta, 1e-5).unwrap();
        let composed = tape.saved_bytes() - before;
        assert!(
            composed >= 4 * fused,
            "composed {composed} bytes vs fused {fused}"
        );
    }

    #[test]
    fn a_training_node_refuses_an_input_other_than_its_own() {
        // The node carries the output it computed with its statistics; applied to another
        // input of the same channels it must say so, not hand back the wrong output.
        let own = normal(&[4, 3], 0.0, 1.0, 1);
        let (gamma, beta) = (channel(3, 1.0, 3), channel(3, 0.0, 4));
        let (node, _) = BatchNormNode::training(
            own.as_slice().unwrap(),
            Dims::of(own.shape()),
            gamma.as_slice().unwrap(),
            beta.as_slice().unwrap(),
            1e-5,
        );
        let tape = Tape::<f64>::new();
        let other = tape.var(normal(&[6, 3], 0.0, 1.0, 2));
        let (g, b) = (tape.var(gamma.clone()), tape.var(beta.clone()));
        let error = tape.apply(node.clone(), &[other, g, b]).unwrap_err();
        assert_eq!(
            error.to_string(),
            "batch_norm: the node's output has 12 values, x has 18"
        );
        // Its own input gives the output the statistics were computed for.
        let x = tape.var(own.clone());
        let y = tape.apply(node, &[x, g, b]).unwrap();
        let (expected, _) = crate::batchnorm_forward(&own, &gamma, &beta, 1e-5).unwrap();
        assert_eq!(y.value().as_ref(), &expected);
    }

    #[test]
    fn recorded_backwards_of_both_forms_give_the_hessian_vector_product() {
        let recorded = || tape::GradOptions {
            create_graph: true,
            upstream: None,
        };
        let (x0, v) = (normal(&[5, 3], 0.5, 2.0, 1), normal(&[5, 3], 0.0, 1.0, 2));
        let (gamma, beta) = (channel(3, 1.0, 3), channel(3, 0.0, 4));
        let dout = normal(&[5, 3], 0.0, 1.0, 5);
        // The loss Σ dout · BN(x): its gradient, recorded, and that gradient's own along v.
        let arrays = (&gamma, &beta, &dout);
        fn loss<'t>(
            t: &'t Tape<f64>,
            x: Var<'t, f64>,
            composed: bool,
            (gamma, beta, dout): (&Array1<f64>, &Array1<f64>, &ArrayD<f64>),
        ) -> Var<'t, f64> {
            let (g, b) = (t.constant(gamma.clone()), t.constant(beta.clone()));
            let f = if composed { batch_norm_composed } else { batch_norm };
            f(x, g, b, 1e-5)
                .unwrap()
                .try_mul(t.constant(dout.clone()))
                .unwrap()
                .sum()
        }
        let gradient = |x0: ArrayD<f64>| {
            let tape = Tape::<f64>::new();
            let x = tape.var(x0);
            loss(&tape, x, false, arrays)
                .backward()
                .unwrap()
                .wrt(x)
                .unwrap()
                .clone()
        };
        let h = 1e-5;
        let numeric = (gradient(&x0 + &(&v * h)) - gradient(&x0 - &(&v * h))) / (2.0 * h);
        for composed in [false, true] {
            let tape = Tape::<f64>::new();
            let x = tape.var(x0.clone());
            let dx = tape
                .grad(loss(&tape, x, composed, arrays), &[x], recorded())
                .unwrap()[0]
                .unwrap();
            let hvp = dx
                .try_mul(tape.constant(v.clone()))
                .unwrap()
                .sum()
                .backward()
                .unwrap();
            let analytic = hvp.wrt(x).unwrap();
            assert!(analytic.abs_diff_eq(&numeric, 1e-6), "{analytic} vs {numeric}");
        }
        // The second-order checker: the composition passes, for x, gamma and beta.
        let inputs = [x0, gamma.into_dyn(), beta.into_dyn()];
        let report =
            tape::check_second_order(|_, v| Ok(batch_norm_composed(v[0], v[1], v[2], 1e-5)?), &inputs)
                .unwrap();
        assert_eq!(report.checked, 15 + 3 + 3);
    }

    #[test]
    fn tape_level_errors_name_the_argument() {
        let tape = Tape::<f64>::new();
        let x = tape.var(normal(&[4, 3], 0.0, 1.0, 1));
        let gamma = tape.var(array![1.0, 1.0]);
        let beta = tape.var(array![0.0, 0.0, 0.0]);
        let error = batch_norm(x, gamma, beta, 1e-5).unwrap_err();
        assert_eq!(
            error.to_string(),
            "gamma has 2 elements, expected 3 (channels of x)"
        );
        let error = batch_norm_composed(x, gamma, beta, 1e-5).unwrap_err();
        assert_eq!(
            error.to_string(),
            "gamma has 2 elements, expected 3 (channels of x)"
        );
        let matrix_gamma = tape.var(ndarray::Array2::<f64>::ones((3, 1)));
        assert_eq!(
            batch_norm(x, matrix_gamma, beta, 1e-5).unwrap_err().to_string(),
            "gamma has shape [3, 1], expected [3] (one value per channel of x)"
        );
        let other = Tape::<f64>::new();
        let foreign = other.var(array![1.0, 1.0, 1.0]);
        assert!(matches!(
            batch_norm(x, foreign, beta, 1e-5),
            Err(Error::Tape(TapeError::ForeignVar { op })) if op == "batch_norm"
        ));
        // Applied directly with the wrong inputs, the node's own check answers.
        let node = BatchNormNode::new(vec![0.0; 3], vec![1.0; 3], true);
        let error = tape.apply(node.clone(), &[x, beta]).unwrap_err();
        assert_eq!(
            error.to_string(),
            "batch_norm: takes 3 inputs (x, gamma, beta), got 2"
        );
    }
}

//! BatchNorm's kinds: `train` (one training call) and `sequence` (training steps, then an
//! evaluation call).

use layers::{BatchNorm, Mode, batchnorm_backward, batchnorm_forward};
use ndarray::{Array1, ArrayD};
use serde_json::Value;
use tape::{Element, Tape};

use super::{Errors, GoldenError, Obj, Tensor, format_error, gradient_or_empty, relative_error};

/// One training-mode call.
#[derive(Debug, Clone)]
pub struct TrainCase {
    /// Inputs `x`, `gamma`, `beta`, `dout`.
    pub x: Tensor,
    #[allow(missing_docs)]
    pub gamma: Tensor,
    #[allow(missing_docs)]
    pub beta: Tensor,
    #[allow(missing_docs)]
    pub dout: Tensor,
    /// The `eps`.
    pub eps: f64,
    /// The momentum of the running-statistics update.
    pub momentum: f64,
    /// Expected results by name: `out`, `dx`, `dgamma`, `dbeta`, `batch_mean`,
    /// `batch_var_biased`, `running_mean_after`, `running_var_after`.
    pub expected: Vec<(&'static str, Tensor)>,
}

/// One training step of a sequence.
#[derive(Debug, Clone)]
pub struct Step {
    /// The batch.
    pub x: Tensor,
    /// Expected `out`, `running_mean`, `running_var`.
    pub expected: Vec<(&'static str, Tensor)>,
    /// Expected count after the step.
    pub num_batches_tracked: u64,
}

/// Training steps of a layer, then one evaluation-mode call.
#[derive(Debug, Clone)]
pub struct SequenceCase {
    /// The `eps`.
    pub eps: f64,
    /// The momentum, `None` for the cumulative average.
    pub momentum: Option<f64>,
    /// The layer's weight and bias.
    pub gamma: Tensor,
    #[allow(missing_docs)]
    pub beta: Tensor,
    /// The training steps.
    pub steps: Vec<Step>,
    /// Evaluation input and upstream gradient.
    pub eval_x: Tensor,
    #[allow(missing_docs)]
    pub eval_dout: Tensor,
    /// Expected `eval_out`, `eval_dx`, `eval_dgamma`, `eval_dbeta`.
    pub expected: Vec<(&'static str, Tensor)>,
}

pub(super) fn parse_train(case: &Obj<'_>) -> Result<TrainCase, GoldenError> {
    Ok(TrainCase {
        eps: case.number("eps")?,
        x: case.tensor("x")?,
        gamma: case.tensor("gamma")?,
        beta: case.tensor("beta")?,
        dout: case.tensor("dout")?,
        momentum: case.number("momentum")?,
        expected: case.tensors(&[
            "out",
            "dx",
            "dgamma",
            "dbeta",
            "batch_mean",
            "batch_var_biased",
            "running_mean_after",
            "running_var_after",
        ])?,
    })
}

pub(super) fn parse_sequence(case: &Obj<'_>) -> Result<SequenceCase, GoldenError> {
    let eps = case.number("eps")?;
    let momentum = match case.field("momentum")? {
        Value::Null => None,
        _ => Some(case.number("momentum")?),
    };
    let steps = case
        .field("train_steps")?
        .as_array()
        .ok_or_else(|| format_error(format!("{}.train_steps", case.at), "expected an array"))?
        .iter()
        .enumerate()
        .map(|(i, step)| {
            let step = Obj {
                at: format!("{}.train_steps[{i}]", case.at),
                value: step,
            };
            Ok(Step {
                x: step.tensor("x")?,
                expected: step.tensors(&["out", "running_mean", "running_var"])?,
                num_batches_tracked: step.count("num_batches_tracked")?,
            })
        })
        .collect::<Result<_, GoldenError>>()?;
    Ok(SequenceCase {
        eps,
        momentum,
        gamma: case.tensor("gamma")?,
        beta: case.tensor("beta")?,
        steps,
        eval_x: case.tensor("eval_x")?,
        eval_dout: case.tensor("eval_dout")?,
        expected: case.tensors(&["eval_out", "eval_dx", "eval_dgamma", "eval_dbeta"])?,
    })
}

fn compare<T: Element>(errors: &mut Errors, name: String, ours: &ArrayD<T>, reference: &Tensor) {
    errors.push((name, relative_error(ours, reference)));
}

/// A training call, run twice: through the functional API (`batchnorm_forward` /
/// `batchnorm_backward`, results prefixed `fn.`) and through the [`BatchNorm`] layer on a tape
/// (the fused node, and the running statistics).
pub(super) fn check_train<T: Element>(train: &TrainCase) -> layers::Result<Errors> {
    let mut errors = Errors::new();
    let x = train.x.to_array::<T>();
    let (gamma, beta) = (train.gamma.to_vector::<T>(), train.beta.to_vector::<T>());
    let dout = train.dout.to_array::<T>();

    // The functional API.
    let (out, cache) = batchnorm_forward(&x, &gamma, &beta, train.eps)?;
    let (dx, dgamma, dbeta) = batchnorm_backward(&dout, &cache)?;
    let stats = |values: &[f64]| Array1::from(values.to_vec()).mapv(T::from_f64_lossy).into_dyn();
    let functional = [
        ("out", out),
        ("dx", dx),
        ("dgamma", dgamma.into_dyn()),
        ("dbeta", dbeta.into_dyn()),
        ("batch_mean", stats(cache.mean())),
        ("batch_var_biased", stats(cache.var())),
    ];

    // The layer on a tape.
    let mut layer = BatchNorm::with_options(gamma.len(), train.eps, Some(train.momentum), true, true)?;
    layer.weight.value = gamma.into_dyn();
    layer.bias.value = beta.into_dyn();
    let tape = Tape::new();
    let x_var = tape.var(x);
    let y = layer.forward(x_var, Mode::Train)?;
    let grads = y.backward_with(dout)?;
    let on_tape = [
        ("out", y.value().as_ref().clone()),
        ("dx", gradient_or_empty(grads.get(x_var))),
        ("dgamma", gradient_or_empty(layer.weight.grad(&grads))),
        ("dbeta", gradient_or_empty(layer.bias.grad(&grads))),
        ("running_mean_after", layer.running_mean.clone().into_dyn()),
        ("running_var_after", layer.running_var.clone().into_dyn()),
    ];
    for (name, reference) in &train.expected {
        if let Some((_, ours)) = functional.iter().find(|(n, _)| n == name) {
            compare(&mut errors, format!("fn.{name}"), ours, reference);
        }
        if let Some((_, ours)) = on_tape.iter().find(|(n, _)| n == name) {
            compare(&mut errors, name.to_string(), ours, reference);
        }
    }
    Ok(errors)
}

/// Training steps through the [`BatchNorm`] layer, then an evaluation call on a tape.
pub(super) fn check_sequence<T: Element>(sequence: &SequenceCase) -> layers::Result<Errors> {
    let mut errors = Errors::new();
    let gamma = sequence.gamma.to_vector::<T>();
    let mut layer = BatchNorm::with_options(gamma.len(), sequence.eps, sequence.momentum, true, true)?;
    layer.weight.value = gamma.into_dyn();
    layer.bias.value = sequence.beta.to_vector::<T>().into_dyn();
    for (i, step) in sequence.steps.iter().enumerate() {
        let tape = Tape::new();
        let y = layer.forward(tape.constant(step.x.to_array::<T>()), Mode::Train)?;
        let ours = [
            ("out", y.value().as_ref().clone()),
            ("running_mean", layer.running_mean.clone().into_dyn()),
            ("running_var", layer.running_var.clone().into_dyn()),
        ];
        for ((name, ours), (_, reference)) in ours.iter().zip(&step.expected) {
            compare(&mut errors, format!("step{}.{name}", i + 1), ours, reference);
        }
        let count_error = layer.num_batches_tracked.abs_diff(step.num_batches_tracked) as f64;
        errors.push((format!("step{}.num_batches_tracked", i + 1), count_error));
    }
    let tape = Tape::new();
    let x = tape.var(sequence.eval_x.to_array::<T>());
    let y = layer.forward(x, Mode::Eval)?;
    let grads = y.backward_with(sequence.eval_dout.to_array::<T>())?;
    let ours = [
        y.value().as_ref().clone(),
        gradient_or_empty(grads.get(x)),
        gradient_or_empty(layer.weight.grad(&grads)),
        gradient_or_empty(layer.bias.grad(&grads)),
    ];
    for (ours, (name, reference)) in ours.iter().zip(&sequence.expected) {
        compare(&mut errors, name.to_string(), ours, reference);
    }
    Ok(errors)
}

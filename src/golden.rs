//! Reading and checking golden BatchNorm results (the format of
//! `tests/data/pytorch_batchnorm.json`, made with PyTorch): every case is recomputed with this
//! project's code in `f32` or `f64` and compared with the file.
//!
//! Each comparison is a relative error: the largest absolute difference divided by the largest
//! absolute reference value (the absolute difference where the reference is all zeros).

use std::fmt;
use std::path::Path;

use layers::{BatchNorm, Mode, batchnorm_backward, batchnorm_forward};
use ndarray::{Array1, ArrayD, IxDyn};
use serde_json::Value;
use tape::{Element, Tape};

/// Why a golden file could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GoldenError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The path given.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not JSON.
    #[error("not valid JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// The JSON does not have the expected structure.
    #[error("{at}: {problem}")]
    Format {
        /// Where in the file, such as `cases[3] ("nchw").dout`.
        at: String,
        /// What is wrong, with what was expected.
        problem: String,
    },
    /// The case is well-formed but this project rejected its inputs.
    #[error("case {case:?}: {source}")]
    Layer {
        /// The case's name.
        case: String,
        /// The error.
        source: layers::Error,
    },
}

/// An array from the file: shape and row-major data in `f64`.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    /// The shape.
    pub shape: Vec<usize>,
    /// The values, row-major.
    pub data: Vec<f64>,
}

impl Tensor {
    /// As an array of `T` (rounding for `f32`; the file's inputs are exact in `f32`).
    pub fn to_array<T: Element>(&self) -> ArrayD<T> {
        ArrayD::from_shape_vec(
            IxDyn(&self.shape),
            self.data.iter().map(|&v| T::from_f64_lossy(v)).collect(),
        )
        .unwrap_or_else(|_| unreachable!("element count checked when parsing"))
    }

    fn to_vector<T: Element>(&self) -> Array1<T> {
        self.data.iter().map(|&v| T::from_f64_lossy(v)).collect()
    }
}

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

/// What a case checks.
#[derive(Debug, Clone)]
pub enum CaseKind {
    /// A single training call.
    Train(TrainCase),
    /// A training sequence and an evaluation call.
    Sequence(SequenceCase),
}

/// One case of the file.
#[derive(Debug, Clone)]
pub struct Case {
    /// Its name.
    pub name: String,
    /// The `eps`.
    pub eps: f64,
    /// What it checks.
    pub kind: CaseKind,
}

/// The result of one case: the relative error of each compared result.
#[derive(Debug, Clone)]
pub struct CaseReport {
    /// The case's name.
    pub name: String,
    /// `"train"` or `"sequence"`.
    pub kind: &'static str,
    /// `(result name, relative error)` in the order compared.
    pub errors: Vec<(String, f64)>,
}

impl CaseReport {
    /// The largest relative error of the case (NaN counts as infinite).
    pub fn max_error(&self) -> f64 {
        self.errors
            .iter()
            .map(|(_, e)| if e.is_nan() { f64::INFINITY } else { *e })
            .fold(0.0, f64::max)
    }
}

impl fmt::Display for CaseReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({}): max {:.2e} |", self.name, self.kind, self.max_error())?;
        for (name, error) in &self.errors {
            write!(f, " {name} {error:.1e}")?;
        }
        Ok(())
    }
}

/// Reads and parses a golden file.
///
/// # Errors
/// [`GoldenError::Io`], [`GoldenError::Json`] or [`GoldenError::Format`] naming the place.
pub fn load(path: impl AsRef<Path>) -> Result<Vec<Case>, GoldenError> {
    let path = path.as_ref();
    let text = std::fs::read_to_string(path).map_err(|source| GoldenError::Io {
        path: path.display().to_string(),
        source,
    })?;
    parse(&text)
}

/// Parses the text of a golden file.
///
/// # Errors
/// [`GoldenError::Json`] or [`GoldenError::Format`] naming the place and the problem.
pub fn parse(text: &str) -> Result<Vec<Case>, GoldenError> {
    let root: Value = serde_json::from_str(text)?;
    let cases = root
        .get("cases")
        .and_then(Value::as_array)
        .ok_or_else(|| format_error("the file", "expected an object with a \"cases\" array"))?;
    cases
        .iter()
        .enumerate()
        .map(|(i, case)| parse_case(i, case))
        .collect()
}

fn format_error(at: impl Into<String>, problem: impl Into<String>) -> GoldenError {
    GoldenError::Format {
        at: at.into(),
        problem: problem.into(),
    }
}

/// A JSON object with a path for messages.
struct Obj<'a> {
    at: String,
    value: &'a Value,
}

impl<'a> Obj<'a> {
    fn field(&self, key: &str) -> Result<&'a Value, GoldenError> {
        self.value
            .get(key)
            .ok_or_else(|| format_error(&self.at, format!("missing field \"{key}\"")))
    }

    fn number(&self, key: &str) -> Result<f64, GoldenError> {
        self.field(key)?
            .as_f64()
            .ok_or_else(|| format_error(format!("{}.{key}", self.at), "expected a number"))
    }

    fn count(&self, key: &str) -> Result<u64, GoldenError> {
        self.field(key)?
            .as_u64()
            .ok_or_else(|| format_error(format!("{}.{key}", self.at), "expected a whole number >= 0"))
    }

    fn tensor(&self, key: &str) -> Result<Tensor, GoldenError> {
        let at = format!("{}.{key}", self.at);
        let value = self.field(key)?;
        let shape: Vec<usize> = value
            .get("shape")
            .and_then(Value::as_array)
            .and_then(|dims| dims.iter().map(|d| d.as_u64().map(|d| d as usize)).collect())
            .ok_or_else(|| format_error(&at, "expected {\"shape\": [whole numbers], \"data\": [numbers]}"))?;
        let data: Vec<f64> = value
            .get("data")
            .and_then(Value::as_array)
            .and_then(|values| values.iter().map(Value::as_f64).collect())
            .ok_or_else(|| format_error(&at, "expected \"data\": an array of numbers"))?;
        let count = element_count(&shape);
        match count {
            None => {
                return Err(format_error(
                    &at,
                    format!("shape {shape:?} is larger than an array can be"),
                ));
            }
            Some(count) if count != data.len() => {
                return Err(format_error(
                    &at,
                    format!("shape {shape:?} needs {count} values, data has {}", data.len()),
                ));
            }
            Some(_) => {}
        }
        Ok(Tensor { shape, data })
    }

    fn tensors(&self, keys: &[&'static str]) -> Result<Vec<(&'static str, Tensor)>, GoldenError> {
        keys.iter().map(|&key| Ok((key, self.tensor(key)?))).collect()
    }
}

/// The number of values of an array of `shape`, checked: `None` where the product of its
/// non-zero sizes exceeds `isize::MAX` (no array of it can exist; unchecked, a crafted shape's
/// product wraps and can pass for the data's length).
fn element_count(shape: &[usize]) -> Option<usize> {
    let nonzero = shape
        .iter()
        .filter(|&&size| size != 0)
        .try_fold(1usize, |count, &size| count.checked_mul(size))
        .filter(|&count| count <= isize::MAX as usize)?;
    Some(if shape.contains(&0) { 0 } else { nonzero })
}

fn parse_case(index: usize, value: &Value) -> Result<Case, GoldenError> {
    let name = value
        .get("name")
        .and_then(Value::as_str)
        .unwrap_or("?")
        .to_string();
    let case = Obj {
        at: format!("cases[{index}] ({name:?})"),
        value,
    };
    let eps = case.number("eps")?;
    let kind = match case.field("kind")?.as_str() {
        Some("train") => CaseKind::Train(TrainCase {
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
        }),
        Some("sequence") => {
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
            CaseKind::Sequence(SequenceCase {
                momentum,
                gamma: case.tensor("gamma")?,
                beta: case.tensor("beta")?,
                steps,
                eval_x: case.tensor("eval_x")?,
                eval_dout: case.tensor("eval_dout")?,
                expected: case.tensors(&["eval_out", "eval_dx", "eval_dgamma", "eval_dbeta"])?,
            })
        }
        _ => {
            return Err(format_error(
                format!("{}.kind", case.at),
                format!("expected \"train\" or \"sequence\", got {}", case.field("kind")?),
            ));
        }
    };
    Ok(Case { name, eps, kind })
}

/// Max abs difference over max abs reference (the abs difference if the reference is all 0).
/// A shape mismatch is an infinite error.
pub fn relative_error<T: Element>(ours: &ArrayD<T>, reference: &Tensor) -> f64 {
    if ours.shape() != reference.shape.as_slice() {
        return f64::INFINITY;
    }
    let mut max_diff = 0.0f64;
    let mut max_ref = 0.0f64;
    for (&a, &b) in ours.iter().zip(&reference.data) {
        let diff = (a.as_f64() - b).abs();
        max_diff = if diff.is_nan() {
            f64::INFINITY
        } else {
            max_diff.max(diff)
        };
        max_ref = max_ref.max(b.abs());
    }
    if max_ref > 0.0 {
        max_diff / max_ref
    } else {
        max_diff
    }
}

/// Recomputes a case in `T` and compares every result.
///
/// Training cases run twice: through the functional API (`batchnorm_forward` /
/// `batchnorm_backward`, results prefixed `fn.`) and through the [`BatchNorm`] layer on a tape
/// (the fused node, and the running statistics).
///
/// # Errors
/// [`GoldenError::Layer`] when this project rejects the case's inputs.
pub fn check_case<T: Element>(case: &Case) -> Result<CaseReport, GoldenError> {
    let layer_error = |source| GoldenError::Layer {
        case: case.name.clone(),
        source,
    };
    let mut errors: Vec<(String, f64)> = Vec::new();
    let compare = |errors: &mut Vec<(String, f64)>, name: String, ours: &ArrayD<T>, reference: &Tensor| {
        errors.push((name, relative_error(ours, reference)));
    };
    let kind = match &case.kind {
        CaseKind::Train(train) => {
            let x = train.x.to_array::<T>();
            let (gamma, beta) = (train.gamma.to_vector::<T>(), train.beta.to_vector::<T>());
            let dout = train.dout.to_array::<T>();

            // The functional API.
            let (out, cache) = batchnorm_forward(&x, &gamma, &beta, case.eps).map_err(layer_error)?;
            let (dx, dgamma, dbeta) = batchnorm_backward(&dout, &cache).map_err(layer_error)?;
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
            let mut layer = BatchNorm::with_options(gamma.len(), case.eps, Some(train.momentum), true, true)
                .map_err(layer_error)?;
            layer.weight.value = gamma.into_dyn();
            layer.bias.value = beta.into_dyn();
            let tape = Tape::new();
            let x_var = tape.var(x);
            let y = layer.forward(x_var, Mode::Train).map_err(layer_error)?;
            let grads = y.backward_with(dout).map_err(|e| layer_error(e.into()))?;
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
            "train"
        }
        CaseKind::Sequence(sequence) => {
            let gamma = sequence.gamma.to_vector::<T>();
            let mut layer = BatchNorm::with_options(gamma.len(), case.eps, sequence.momentum, true, true)
                .map_err(layer_error)?;
            layer.weight.value = gamma.into_dyn();
            layer.bias.value = sequence.beta.to_vector::<T>().into_dyn();
            for (i, step) in sequence.steps.iter().enumerate() {
                let tape = Tape::new();
                let y = layer
                    .forward(tape.constant(step.x.to_array::<T>()), Mode::Train)
                    .map_err(layer_error)?;
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
            let y = layer.forward(x, Mode::Eval).map_err(layer_error)?;
            let grads = y
                .backward_with(sequence.eval_dout.to_array::<T>())
                .map_err(|e| layer_error(e.into()))?;
            let ours = [
                y.value().as_ref().clone(),
                gradient_or_empty(grads.get(x)),
                gradient_or_empty(layer.weight.grad(&grads)),
                gradient_or_empty(layer.bias.grad(&grads)),
            ];
            for (ours, (name, reference)) in ours.iter().zip(&sequence.expected) {
                compare(&mut errors, name.to_string(), ours, reference);
            }
            "sequence"
        }
    };
    Ok(CaseReport {
        name: case.name.clone(),
        kind,
        errors,
    })
}

/// A gradient, or an empty array where there is none (compared, it counts as an infinite error).
fn gradient_or_empty<T: Element>(gradient: Option<&ArrayD<T>>) -> ArrayD<T> {
    gradient.cloned().unwrap_or_else(|| ArrayD::zeros(IxDyn(&[0])))
}

//! Reading and checking golden results made with PyTorch (the format of the files in
//! `tests/data/`, described in its README): every case is recomputed with this project's code in
//! `f32` or `f64` and compared with the file. The kinds are BatchNorm's `train` and `sequence`
//! ([`TrainCase`], [`SequenceCase`]), `conv2d`, `max_pool2d` and `avg_pool2d` ([`ConvCase`],
//! [`PoolCase`]), `layer_norm` and `group_norm` ([`NormCase`]), and BatchNorm's
//! `double_backward` ([`DoubleBackwardCase`]).
//!
//! Each comparison is a relative error: the largest absolute difference divided by the largest
//! absolute reference value (the absolute difference where the reference is all zeros).

use std::fmt;
use std::path::Path;

mod batch_norm;
mod conv;
mod double;
mod norm;

use ndarray::{Array1, ArrayD, IxDyn};
use serde_json::Value;
use tape::Element;

pub use self::batch_norm::{SequenceCase, Step, TrainCase};
pub use self::conv::{ConvCase, PoolCase};
pub use self::double::DoubleBackwardCase;
pub use self::norm::{NormCase, Normalized};

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

/// What a case checks.
#[derive(Debug, Clone)]
pub enum CaseKind {
    /// A single BatchNorm training call.
    Train(TrainCase),
    /// A BatchNorm training sequence and an evaluation call.
    Sequence(SequenceCase),
    /// A convolution, forward and backward.
    Conv2d(ConvCase),
    /// A max or average pooling, forward and backward.
    Pool(PoolCase),
    /// A LayerNorm or GroupNorm, forward and backward.
    Norm(NormCase),
    /// BatchNorm differentiated twice.
    DoubleBackward(DoubleBackwardCase),
}

impl CaseKind {
    /// The kind's name in the file.
    pub fn name(&self) -> &'static str {
        match self {
            CaseKind::Train(_) => "train",
            CaseKind::Sequence(_) => "sequence",
            CaseKind::Conv2d(_) => "conv2d",
            CaseKind::Pool(pool) => pool.kind_name(),
            CaseKind::Norm(norm) => norm.kind_name(),
            CaseKind::DoubleBackward(_) => "double_backward",
        }
    }
}

/// The kinds a file may hold.
const KINDS: &str = "\"train\", \"sequence\", \"conv2d\", \"max_pool2d\", \"avg_pool2d\", \"layer_norm\", \"group_norm\" or \"double_backward\"";

/// One case of the file.
#[derive(Debug, Clone)]
pub struct Case {
    /// Its name.
    pub name: String,
    /// What it checks.
    pub kind: CaseKind,
}

/// The result of one case: the relative error of each compared result.
#[derive(Debug, Clone)]
pub struct CaseReport {
    /// The case's name.
    pub name: String,
    /// The case's kind: `"train"`, `"sequence"`, `"conv2d"`, ... ([`CaseKind::name`]).
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
        parse_tensor(self.field(key)?, &format!("{}.{key}", self.at))
    }

    /// A tensor, or `None` where the field is `null`.
    fn optional_tensor(&self, key: &str) -> Result<Option<Tensor>, GoldenError> {
        match self.field(key)? {
            Value::Null => Ok(None),
            _ => self.tensor(key).map(Some),
        }
    }

    /// An `[h, w]` pair of whole numbers.
    fn pair(&self, key: &str) -> Result<[usize; 2], GoldenError> {
        let value = self.field(key)?;
        match value
            .as_array()
            .map(|v| v.iter().map(Value::as_u64).collect::<Vec<_>>())
        {
            Some(v) if v.len() == 2 && v.iter().all(Option::is_some) => {
                Ok([0, 1].map(|i| v[i].unwrap_or_default() as usize))
            }
            _ => Err(format_error(
                format!("{}.{key}", self.at),
                format!("expected [h, w], two whole numbers >= 0, got {value}"),
            )),
        }
    }

    fn tensors(&self, keys: &[&'static str]) -> Result<Vec<(&'static str, Tensor)>, GoldenError> {
        keys.iter().map(|&key| Ok((key, self.tensor(key)?))).collect()
    }
}

/// An array of the golden format, `{"shape": [...], "data": [...]}`, checked: whole-number
/// sizes, numbers, as many as the shape holds. `at` names the place in errors.
///
/// # Errors
/// [`GoldenError::Format`] naming `at` and the problem.
pub fn parse_tensor(value: &Value, at: &str) -> Result<Tensor, GoldenError> {
    let shape: Vec<usize> = value
        .get("shape")
        .and_then(Value::as_array)
        .and_then(|dims| dims.iter().map(|d| d.as_u64().map(|d| d as usize)).collect())
        .ok_or_else(|| format_error(at, "expected {\"shape\": [whole numbers], \"data\": [numbers]}"))?;
    let data: Vec<f64> = value
        .get("data")
        .and_then(Value::as_array)
        .and_then(|values| values.iter().map(Value::as_f64).collect())
        .ok_or_else(|| format_error(at, "expected \"data\": an array of numbers"))?;
    let count = element_count(&shape);
    match count {
        None => {
            return Err(format_error(
                at,
                format!("shape {shape:?} is larger than an array can be"),
            ));
        }
        Some(count) if count != data.len() => {
            return Err(format_error(
                at,
                format!("shape {shape:?} needs {count} values, data has {}", data.len()),
            ));
        }
        Some(_) => {}
    }
    Ok(Tensor { shape, data })
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
    let kind = match case.field("kind")?.as_str() {
        Some("train") => CaseKind::Train(batch_norm::parse_train(&case)?),
        Some("sequence") => CaseKind::Sequence(batch_norm::parse_sequence(&case)?),
        Some("conv2d") => CaseKind::Conv2d(conv::parse_conv(&case)?),
        Some(kind @ ("max_pool2d" | "avg_pool2d")) => {
            CaseKind::Pool(conv::parse_pool(&case, kind == "max_pool2d")?)
        }
        Some(kind @ ("layer_norm" | "group_norm")) => {
            CaseKind::Norm(norm::parse_norm(&case, kind == "layer_norm")?)
        }
        Some("double_backward") => CaseKind::DoubleBackward(double::parse_double_backward(&case)?),
        _ => {
            return Err(format_error(
                format!("{}.kind", case.at),
                format!("expected {KINDS}, got {}", case.field("kind")?),
            ));
        }
    };
    Ok(Case { name, kind })
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

/// Recomputes a case in `T` and compares every result. BatchNorm's training calls run through the
/// functional API (results prefixed `fn.`) and through the layer on a tape; sequences through the
/// layer; convolutions, poolings and the normalizations through the fused node and through its
/// composition from tape primitives (results prefixed `composed.`).
///
/// # Errors
/// [`GoldenError::Layer`] when this project rejects the case's inputs.
pub fn check_case<T: Element>(case: &Case) -> Result<CaseReport, GoldenError> {
    let layer_error = |source| GoldenError::Layer {
        case: case.name.clone(),
        source,
    };
    let errors = match &case.kind {
        CaseKind::Train(train) => batch_norm::check_train::<T>(train),
        CaseKind::Sequence(sequence) => batch_norm::check_sequence::<T>(sequence),
        CaseKind::Conv2d(conv) => conv::check_conv::<T>(conv),
        CaseKind::Pool(pool) => conv::check_pool::<T>(pool),
        CaseKind::Norm(norm) => norm::check_norm::<T>(norm),
        CaseKind::DoubleBackward(double) => double::check_double_backward::<T>(double),
    }
    .map_err(layer_error)?;
    Ok(CaseReport {
        name: case.name.clone(),
        kind: case.kind.name(),
        errors,
    })
}

/// `(result name, relative error)` of each compared result, in order.
type Errors = Vec<(String, f64)>;

/// A gradient, or an empty array where there is none (compared, it counts as an infinite error).
fn gradient_or_empty<T: Element>(gradient: Option<&ArrayD<T>>) -> ArrayD<T> {
    gradient.cloned().unwrap_or_else(|| ArrayD::zeros(IxDyn(&[0])))
}

//! The error type of the layers. Every message names the argument, what was expected and what
//! was got.

use tape::TapeError;

/// What went wrong in a layer, a loss or an optimizer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An argument has the wrong shape (or rank).
    #[error("{name} has shape {got:?}, expected {expected}")]
    Shape {
        /// The argument (`x`, `gamma`, `logits`, ...).
        name: &'static str,
        /// Its shape.
        got: Vec<usize>,
        /// The shape or rank it must have, in words, with where that comes from: `[5, 4] (axis 1
        /// holds the 4 channels of the layer)`.
        expected: String,
    },
    /// An argument has the wrong number of elements.
    #[error("{name} has {}, expected {expected} ({of})", count(*got, "element"))]
    Length {
        /// The argument (`gamma`, `running_mean`, `labels`, ...).
        name: &'static str,
        /// Its number of elements.
        got: usize,
        /// The number it must have.
        expected: usize,
        /// Where the expected number comes from, such as "channels of x".
        of: &'static str,
    },
    /// BatchNorm's training-mode statistics need at least two values per channel.
    #[error(
        "BatchNorm in training needs more than 1 value per channel, got input of shape {shape:?} \
         ({} per channel)",
        count(*per_channel, "value")
    )]
    SingleValuePerChannel {
        /// The input's shape.
        shape: Vec<usize>,
        /// Values per channel (N times the spatial size).
        per_channel: usize,
    },
    /// A numeric setting is out of its range.
    #[error("{name} must be {expected}, got {got}")]
    InvalidSetting {
        /// The setting (`eps`, `momentum`, ...).
        name: &'static str,
        /// Its valid range, in words.
        expected: &'static str,
        /// The value given.
        got: f64,
    },
    /// `groups` does not divide a channel count.
    #[error("groups = {groups} does not divide the {channels} {of}")]
    Groups {
        /// The number of groups.
        groups: usize,
        /// The channel count.
        channels: usize,
        /// Whose channels: "input channels of x", ...
        of: &'static str,
    },
    /// A class label is not below the number of classes.
    #[error("label {label} at row {row} is out of range for {classes} classes")]
    Label {
        /// The row of the label.
        row: usize,
        /// The label.
        label: usize,
        /// The number of classes (columns of the logits).
        classes: usize,
    },
    /// A value that must be a number is NaN.
    #[error("{name} has NaN at index {index:?}; expected numbers (a net that diverged gives NaN)")]
    Nan {
        /// The argument (`logits`, ...).
        name: &'static str,
        /// The index of its first NaN.
        index: Vec<usize>,
    },
    /// An optimizer was given a different set of parameters than before.
    #[error(
        "optimizer state holds {}, got {got}; use one optimizer per set of parameters",
        count(*expected, "parameter")
    )]
    ParameterCount {
        /// Parameters the state was made for.
        expected: usize,
        /// Parameters given now.
        got: usize,
    },
    /// An optimizer was given a parameter of another shape than at its first step (the
    /// parameters changed, or came in another order).
    #[error(
        "parameter {index} has shape {got:?}, expected {expected:?} (its shape at the optimizer's \
         first step); give the optimizer the same parameters in the same order every step"
    )]
    ParameterShape {
        /// The parameter's position in the list given to `step`.
        index: usize,
        /// Its shape at the first step.
        expected: Vec<usize>,
        /// Its shape now.
        got: Vec<usize>,
    },
    /// An optimizer step with gradients of a tape on which no parameter was used.
    #[error(
        "none of the {} was used on the tape these gradients come from; run the forward pass \
         (which binds them) on that tape before backward",
        count(*parameters, "parameter")
    )]
    ForeignGradients {
        /// The number of parameters given to `step`.
        parameters: usize,
    },
    /// A state dictionary lacks a key the layer needs.
    #[error("state dict has no {key:?}; expected keys {expected:?}")]
    MissingKey {
        /// The missing key.
        key: String,
        /// Every key the layer expects.
        expected: Vec<String>,
    },
    /// A state dictionary has a key the layer does not (a strict load).
    #[error("state dict has {key:?}, which the layer does not have; expected keys {expected:?}")]
    UnexpectedKey {
        /// The unexpected key.
        key: String,
        /// Every key the layer expects.
        expected: Vec<String>,
    },
    /// A state dictionary's array has another shape than the layer's.
    #[error("state dict's {key:?} has shape {got:?}, expected {expected:?}")]
    StateShape {
        /// The key.
        key: String,
        /// The layer's shape for it.
        expected: Vec<usize>,
        /// The shape in the dict.
        got: Vec<usize>,
    },
    /// A model file could not be read or written.
    #[error("{path}: {reason}")]
    File {
        /// The path given.
        path: String,
        /// What went wrong.
        reason: String,
    },
    /// A file's tensor is not of a float type where a float is expected.
    #[error("tensor {key:?} is {got}, expected a float tensor (F32 or F64)")]
    TensorDtype {
        /// The tensor's name.
        key: String,
        /// Its type in the file.
        got: String,
    },
    /// An error from the tape (a shape error of a primitive, a `Var` of another tape, ...).
    #[error(transparent)]
    Tape(#[from] TapeError),
}

/// A layer's error as a tape error, so that `?` passes it on where a [`TapeError`] is expected
/// (in a closure given to [`tape::check_gradients`], say): a tape error as it was, any other
/// kept as the source of a [`TapeError::Op`] named `layers`.
impl From<Error> for TapeError {
    fn from(error: Error) -> Self {
        match error {
            Error::Tape(inner) => inner,
            other => TapeError::op("layers", other),
        }
    }
}

/// `n` and the noun, in the plural unless `n` is 1: "1 element", "3 elements".
pub(crate) fn count(n: usize, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

/// Shorthand for `Result<T, layers::Error>`.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Checks that a setting such as `eps` is finite and at least 0.
pub(crate) fn check_non_negative(name: &'static str, value: f64) -> Result<()> {
    if value.is_finite() && value >= 0.0 {
        Ok(())
    } else {
        Err(Error::InvalidSetting {
            name,
            expected: "a finite number >= 0",
            got: value,
        })
    }
}

//! The error type of the layers. Every message names the argument, what was expected and what
//! was got.

use tape::TapeError;

/// What went wrong in a layer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The input has a rank the layer does not take.
    #[error("x has shape {got:?}, expected rank 2 to 5: (N, C) or (N, C, *spatial)")]
    InputRank {
        /// The input's shape.
        got: Vec<usize>,
    },
    /// A per-channel argument has the wrong number of elements.
    #[error("{name} has {got} elements, expected {expected} ({of})")]
    ChannelCount {
        /// The argument (`gamma`, `beta`, `running_mean`, ...).
        name: &'static str,
        /// Its number of elements.
        got: usize,
        /// The number of channels.
        expected: usize,
        /// Where the expected number comes from, such as "channels of x".
        of: &'static str,
    },
    /// An argument has the wrong shape.
    #[error("{name} has shape {got:?}, expected {expected:?} ({of})")]
    Shape {
        /// The argument.
        name: &'static str,
        /// Its shape.
        got: Vec<usize>,
        /// The shape it must have.
        expected: Vec<usize>,
        /// Where the expected shape comes from, such as "the shape of x".
        of: &'static str,
    },
    /// Training-mode statistics need at least two values per channel.
    #[error(
        "expected more than 1 value per channel when training, got input of shape {shape:?} \
         ({per_channel} value per channel)"
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
    /// An optimizer was given a different set of parameters than before.
    #[error(
        "optimizer state holds {expected} parameters, got {got}; use one optimizer per set of parameters"
    )]
    ParameterCount {
        /// Parameters the state was made for.
        expected: usize,
        /// Parameters given now.
        got: usize,
    },
    /// A state dictionary lacks a key the layer needs.
    #[error("state dict has no {key:?}; expected keys {expected:?}")]
    MissingKey {
        /// The missing key.
        key: String,
        /// Every key the layer expects.
        expected: Vec<String>,
    },
    /// An error from the tape (a shape error of a primitive, a `Var` of another tape, ...).
    #[error(transparent)]
    Tape(#[from] TapeError),
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

//! The error type of every fallible tape operation.

use std::error::Error as StdError;

/// What went wrong in a tape operation. Every message says what was expected and what was got.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TapeError {
    /// Two shapes cannot be broadcast together (NumPy rules: trailing axes equal or 1).
    #[error(
        "{op}: shapes {lhs:?} and {rhs:?} cannot be broadcast together (each trailing axis must be equal or 1)"
    )]
    Broadcast {
        /// The operation that broadcast.
        op: &'static str,
        /// Shape of the left operand.
        lhs: Vec<usize>,
        /// Shape of the right operand.
        rhs: Vec<usize>,
    },
    /// An operand had the wrong shape.
    #[error("{op}: {what} has shape {got:?}, expected {expected}")]
    Shape {
        /// The operation that checked.
        op: &'static str,
        /// Which operand, in words.
        what: &'static str,
        /// What the operation needed, in words.
        expected: String,
        /// The shape it got.
        got: Vec<usize>,
    },
    /// A reshape to a shape with another number of elements.
    #[error(
        "reshape: the new shape {to:?} {}, expected {} elements (the input's shape {from:?})",
        count.map_or("is larger than an array can be".to_string(), |count| format!("holds {count} elements")),
        from.iter().product::<usize>()
    )]
    Reshape {
        /// The input's shape.
        from: Vec<usize>,
        /// The shape asked for.
        to: Vec<usize>,
        /// Its number of elements, `None` where that overflows (see [`TapeError::TooLarge`]).
        count: Option<usize>,
    },
    /// A shape whose array could not exist: the product of its non-zero sizes, or its bytes,
    /// exceed `isize::MAX`.
    #[error("{op}: shape {shape:?} is larger than an array can be")]
    TooLarge {
        /// The operation asked for the shape.
        op: &'static str,
        /// The shape.
        shape: Vec<usize>,
    },
    /// A setting of an op (a stride, a kernel size, ...) is out of its range.
    #[error("{op}: {name} must be {expected}, got {got}")]
    InvalidSetting {
        /// The op.
        op: &'static str,
        /// The setting.
        name: &'static str,
        /// Its valid range, in words.
        expected: &'static str,
        /// The value given.
        got: String,
    },
    /// An op was given another number of inputs than it takes.
    #[error("{op}: takes {expected} input(s), got {got}")]
    Arity {
        /// The op.
        op: &'static str,
        /// The number it takes.
        expected: usize,
        /// The number given.
        got: usize,
    },
    /// An axis does not exist in the operand.
    #[error("{op}: axis {axis} is out of range for an array of rank {ndim} (axes 0..{ndim})")]
    Axis {
        /// The operation that checked.
        op: &'static str,
        /// The axis asked for.
        axis: usize,
        /// The rank of the operand.
        ndim: usize,
    },
    /// A `Var` was used with a tape it does not belong to.
    #[error(
        "{op}: this Var belongs to another tape (each Var can only be used with the tape that created it)"
    )]
    ForeignVar {
        /// The op (or method) the foreign `Var` was passed to.
        op: String,
    },
    /// `backward()` without an upstream gradient needs a one-element output.
    #[error(
        "backward() needs a scalar (one-element) output, got shape {shape:?}; use backward_with(grad) to give an upstream gradient"
    )]
    NonScalarOutput {
        /// Shape of the output backward was called on.
        shape: Vec<usize>,
    },
    /// An op that cannot record its backward (a custom op without
    /// [`Function::backward_graph`](crate::Function::backward_graph)) met `create_graph`.
    #[error(
        "{op}: its backward cannot be recorded, so it can be differentiated once, not again (create_graph)"
    )]
    NoGraphRule {
        /// The op's name.
        op: String,
    },
    /// `backward` on a tape made with [`Tape::no_grad`](crate::Tape::no_grad), which records
    /// no graph.
    #[error(
        "backward on a tape made with Tape::no_grad(), which records no graph; use Tape::new() to compute gradients"
    )]
    NotRecorded,
    /// A variable has no gradient because the output does not depend on it.
    #[error(
        "Var #{index} has no gradient: the output backward started from does not depend on it, or it is a constant"
    )]
    NoGradient {
        /// Index of the variable on its tape.
        index: usize,
    },
    /// A backward function returned the wrong number of gradients.
    #[error(
        "{op}: backward returned {got} gradients, expected {expected} (one per input, None where not needed)"
    )]
    GradientCount {
        /// The operation whose backward misbehaved.
        op: String,
        /// Its number of inputs.
        expected: usize,
        /// How many gradients it returned.
        got: usize,
    },
    /// A gradient (given to `backward_with`, or returned by an op's backward) has the wrong shape.
    #[error("{op}: gradient for {what} has shape {got:?}, expected {expected:?}")]
    GradientShape {
        /// The operation (or `backward_with`).
        op: String,
        /// Which gradient, in words.
        what: String,
        /// The shape of the value it is the gradient of.
        expected: Vec<usize>,
        /// The shape it had.
        got: Vec<usize>,
    },
    /// An error raised by a custom op (a [`Function`](crate::Function) implemented outside this crate).
    #[error("{op}: {source}")]
    Op {
        /// The name of the op.
        op: String,
        /// The op's own error.
        #[source]
        source: Box<dyn StdError + Send + Sync>,
    },
}

impl TapeError {
    /// Wraps a custom op's own error, keeping it as the `source`.
    pub fn op(op: impl Into<String>, source: impl Into<Box<dyn StdError + Send + Sync>>) -> Self {
        TapeError::Op {
            op: op.into(),
            source: source.into(),
        }
    }
}

/// Shorthand for `Result<T, TapeError>`.
pub type Result<T, E = TapeError> = std::result::Result<T, E>;

//! The tape: a list of nodes in creation order (which is a topological order of the graph), the
//! `Var` handles that point into it, and the reverse walk that computes gradients.

use std::cell::RefCell;
use std::fmt;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};

use ndarray::{Array, ArrayD, ArrayViewD, Dimension};

use crate::{Element, Function, Result, TapeError};

/// Each tape gets a distinct id, so a `Var` used with the wrong tape is caught.
static NEXT_TAPE_ID: AtomicU64 = AtomicU64::new(0);

/// What a node is: a leaf (trainable or constant) or the result of an op on earlier nodes.
enum NodeKind<T: Element> {
    Variable,
    Constant,
    Op {
        op: Rc<dyn Function<T>>,
        inputs: Vec<usize>,
    },
}

struct Node<T: Element> {
    value: Rc<ArrayD<T>>,
    kind: NodeKind<T>,
    /// True when some trainable variable reaches this node: only these get gradients.
    requires_grad: bool,
}

/// A record of operations on `ndarray` arrays, differentiated in reverse mode.
///
/// Create leaves with [`var`](Tape::var) (trainable: gets a gradient) and
/// [`constant`](Tape::constant) (no gradient), combine the returned [`Var`]s with operators and
/// methods, then call [`backward`](Tape::backward) on a scalar result. Nodes are appended in
/// creation order, so walking the list backwards visits every node after all its consumers.
///
/// A tape is single-threaded and meant to live for one forward and backward pass (one training
/// step); make a new one for the next step.
///
/// # Example
/// ```
/// use ndarray::array;
/// use tape::Tape;
///
/// let tape = Tape::new();
/// let x = tape.var(array![1.0, 2.0, 3.0]);
/// let w = tape.constant(array![0.5, -1.0, 2.0]);
/// let loss = (x * w + 1.0).sum(); // sum(w * x + 1)
/// let grads = loss.backward()?;
/// assert_eq!(loss.scalar(), 0.5 - 2.0 + 6.0 + 3.0);
/// assert_eq!(grads.wrt(x)?, &array![0.5, -1.0, 2.0].into_dyn());
/// # Ok::<(), tape::TapeError>(())
/// ```
pub struct Tape<T: Element> {
    id: u64,
    nodes: RefCell<Vec<Node<T>>>,
    /// False for [`Tape::no_grad`]: ops keep their results, not themselves.
    records: bool,
    /// The nodes each recorded backward ([`Tape::grad`] with `create_graph`) appended, in
    /// order: for drawings ([`Tape::to_dot`]) and [`Tape::recorded_backwards`].
    recorded: RefCell<Vec<std::ops::Range<usize>>>,
}

impl<T: Element> Default for Tape<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T: Element> fmt::Debug for Tape<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tape")
            .field("id", &self.id)
            .field("dtype", &T::NAME)
            .field("nodes", &self.len())
            .field("records", &self.records)
            .finish()
    }
}

impl<T: Element> Tape<T> {
    /// An empty tape.
    pub fn new() -> Self {
        Tape {
            id: NEXT_TAPE_ID.fetch_add(1, Ordering::Relaxed),
            nodes: RefCell::new(Vec::new()),
            records: true,
            recorded: RefCell::new(Vec::new()),
        }
    }

    /// An empty tape for evaluation only (PyTorch's `torch.no_grad()`): every op runs and its
    /// result can be read, but nothing is kept for backward: no op, none of an op's saved state
    /// (a fused node's statistics, say), no gradient flags. [`saved_bytes`](Tape::saved_bytes)
    /// stays 0, and [`backward`](Tape::backward) is an error. For inference and metrics.
    ///
    /// # Example
    /// ```
    /// use ndarray::array;
    /// use tape::Tape;
    ///
    /// let tape = Tape::no_grad();
    /// let w = tape.var(array![[1.0, 2.0], [3.0, 4.0]]);
    /// let y = tape.constant(array![[1.0, 0.0]]).matmul(w)?.tanh();
    /// assert_eq!(y.value()[[0, 1]], 2.0f64.tanh());
    /// assert_eq!(tape.saved_bytes(), 0);
    /// assert!(y.sum().backward().is_err());
    /// # Ok::<(), tape::TapeError>(())
    /// ```
    pub fn no_grad() -> Self {
        Tape {
            records: false,
            ..Self::new()
        }
    }

    /// False for a tape made with [`Tape::no_grad`].
    pub fn records(&self) -> bool {
        self.records
    }

    /// Number of nodes recorded so far.
    pub fn len(&self) -> usize {
        self.nodes.borrow().len()
    }

    /// True when nothing has been recorded.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A trainable leaf: [`backward`](Tape::backward) computes its gradient.
    /// Accepts an array of any dimension (`Array1`, `Array2`, `ArrayD`, ...).
    pub fn var<D: Dimension>(&self, value: Array<T, D>) -> Var<'_, T> {
        self.push(value.into_dyn(), NodeKind::Variable, self.records)
    }

    /// A constant leaf: it takes part in the computation but gets no gradient.
    pub fn constant<D: Dimension>(&self, value: Array<T, D>) -> Var<'_, T> {
        self.push(value.into_dyn(), NodeKind::Constant, false)
    }

    /// A rank-0 constant.
    pub fn scalar(&self, value: T) -> Var<'_, T> {
        self.constant(ndarray::arr0(value))
    }

    /// Every node recorded so far, in creation order (backward visits them in reverse).
    pub fn vars(&self) -> Vec<Var<'_, T>> {
        (0..self.len()).map(|index| Var { tape: self, index }).collect()
    }

    /// The `Var` with this identity, if it belongs to this tape.
    pub fn get(&self, id: VarId) -> Option<Var<'_, T>> {
        (id.tape == self.id && id.index < self.len()).then_some(Var {
            tape: self,
            index: id.index,
        })
    }

    /// Records `op` applied to `inputs`: runs its forward now and its backward during
    /// [`backward`](Tape::backward). This is the custom-op API; see [`Function`].
    ///
    /// # Errors
    /// [`TapeError::ForeignVar`] naming the op if an input belongs to another tape, or whatever the op's
    /// forward returns.
    pub fn apply<F: Function<T>>(&self, mut op: F, inputs: &[Var<'_, T>]) -> Result<Var<'_, T>> {
        let mut indices = Vec::with_capacity(inputs.len());
        for input in inputs {
            if input.tape.id != self.id {
                return Err(TapeError::ForeignVar {
                    op: op.name().to_string(),
                });
            }
            indices.push(input.index);
        }
        // The op gets shared handles to its input values, not a borrow of the node list: an op
        // may record on this tape while it runs.
        let (values, requires_grad) = {
            let nodes = self.nodes.borrow();
            let values: Vec<Rc<ArrayD<T>>> = indices.iter().map(|&i| Rc::clone(&nodes[i].value)).collect();
            (values, indices.iter().any(|&i| nodes[i].requires_grad))
        };
        let views: Vec<ArrayViewD<'_, T>> = values.iter().map(|value| value.view()).collect();
        let output = op.forward(&views)?;
        if !self.records {
            // The op and whatever it saved for backward are dropped here.
            return Ok(self.push(output, NodeKind::Constant, false));
        }
        let kind = NodeKind::Op {
            op: Rc::new(op),
            inputs: indices,
        };
        Ok(self.push(output, kind, requires_grad))
    }

    fn push(&self, value: ArrayD<T>, kind: NodeKind<T>, requires_grad: bool) -> Var<'_, T> {
        let mut nodes = self.nodes.borrow_mut();
        nodes.push(Node {
            value: Rc::new(value),
            kind,
            requires_grad,
        });
        Var {
            tape: self,
            index: nodes.len() - 1,
        }
    }

    /// Bytes the tape keeps for backward beyond its leaves: the value of every op node, plus
    /// each op's own saved state ([`Function::saved_bytes`]). This is the memory a graph costs
    /// between forward and backward, and what a fused op saves over its composition.
    pub fn saved_bytes(&self) -> usize {
        let element = std::mem::size_of::<T>();
        self.nodes
            .borrow()
            .iter()
            .map(|node| match &node.kind {
                NodeKind::Op { op, .. } => node.value.len() * element + op.saved_bytes(),
                NodeKind::Variable | NodeKind::Constant => 0,
            })
            .sum()
    }

    /// Gradients of a scalar (one-element) `output` with respect to every node that needs one.
    ///
    /// # Errors
    /// [`TapeError::NonScalarOutput`] if `output` has more than one element (use
    /// [`backward_with`](Tape::backward_with)), [`TapeError::ForeignVar`] if it belongs to
    /// another tape, or an error from an op's backward.
    pub fn backward(&self, output: Var<'_, T>) -> Result<Gradients<T>> {
        let shape = self.shape_of(output, "backward")?;
        if shape.iter().product::<usize>() != 1 {
            return Err(TapeError::NonScalarOutput { shape });
        }
        self.backward_with(output, ArrayD::from_elem(shape, T::one()))
    }

    /// Gradients of any `output` given the upstream gradient `grad_output` (the gradient of some
    /// loss with respect to `output`, same shape). Gradients accumulate where a value is used
    /// more than once.
    ///
    /// # Errors
    /// [`TapeError::GradientShape`] if `grad_output` does not have `output`'s shape,
    /// [`TapeError::ForeignVar`], [`TapeError::NotRecorded`] on a [`Tape::no_grad`], or an
    /// error from an op's backward.
    pub fn backward_with<D: Dimension>(
        &self,
        output: Var<'_, T>,
        grad_output: Array<T, D>,
    ) -> Result<Gradients<T>> {
        self.checked_backward(output, grad_output.into_dyn(), |_| {})
    }

    fn shape_of(&self, var: Var<'_, T>, op: &'static str) -> Result<Vec<usize>> {
        if var.tape.id != self.id {
            return Err(TapeError::ForeignVar { op: op.into() });
        }
        Ok(self.nodes.borrow()[var.index].value.shape().to_vec())
    }

    pub(crate) fn id(&self) -> u64 {
        self.id
    }

    pub(crate) fn value_of(&self, index: usize) -> Rc<ArrayD<T>> {
        Rc::clone(&self.nodes.borrow()[index].value)
    }

    /// The rule an op node's [`Function::rule`] gives (empty for leaves and ops without one).
    pub(crate) fn rule_of(&self, index: usize) -> String {
        match &self.nodes.borrow()[index].kind {
            NodeKind::Op { op, .. } => op.rule().to_string(),
            NodeKind::Variable | NodeKind::Constant => String::new(),
        }
    }

    pub(crate) fn requires_grad_of(&self, index: usize) -> bool {
        self.nodes.borrow()[index].requires_grad
    }
}

/// A handle to a value on a [`Tape`]: cheap to copy, combined with `+ - * /`, unary `-` and the
/// op methods. The operators panic on shape errors; every fallible op also has a form that
/// returns [`Result`] (`try_add`, `sum_axes`, `matmul`, ...).
#[derive(Clone, Copy)]
pub struct Var<'t, T: Element> {
    pub(crate) tape: &'t Tape<T>,
    pub(crate) index: usize,
}

impl<T: Element> fmt::Debug for Var<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Var")
            .field("tape", &self.tape.id)
            .field("index", &self.index)
            .field("shape", &self.shape())
            .finish()
    }
}

impl<'t, T: Element> Var<'t, T> {
    /// The tape this variable lives on.
    pub fn tape(&self) -> &'t Tape<T> {
        self.tape
    }

    /// Position of this node on its tape (creation order).
    pub fn index(&self) -> usize {
        self.index
    }

    /// This variable's identity, to look it up later with [`Tape::get`] or [`Gradients::get_id`].
    pub fn id(&self) -> VarId {
        VarId {
            tape: self.tape.id,
            index: self.index,
        }
    }

    /// The value (shared, not copied).
    pub fn value(&self) -> Rc<ArrayD<T>> {
        self.tape.value_of(self.index)
    }

    /// The shape of the value.
    pub fn shape(&self) -> Vec<usize> {
        self.value().shape().to_vec()
    }

    /// The value of a one-element `Var`, such as a loss (PyTorch's `item()`).
    ///
    /// # Panics
    /// If the value does not have exactly one element, naming its shape and the caller's line
    /// (see [`try_scalar`](Var::try_scalar) for the `Result`).
    #[track_caller]
    pub fn scalar(&self) -> T {
        match self.try_scalar() {
            Ok(value) => value,
            Err(error) => panic!("{error}"),
        }
    }

    /// The value of a one-element `Var`.
    ///
    /// # Errors
    /// [`TapeError::Shape`] naming the shape when it has no element or more than one.
    pub fn try_scalar(&self) -> Result<T> {
        let value = self.value();
        match value.as_slice_memory_order() {
            Some(&[only]) => Ok(only),
            _ => Err(TapeError::Shape {
                op: "scalar",
                what: "the Var",
                expected: "one element (value() gives every element)".into(),
                got: value.shape().to_vec(),
            }),
        }
    }

    /// What made this node: `"var"` or `"const"` for a leaf, else the op's name (`"mul"`,
    /// `"batch_norm"`, ...).
    pub fn op_name(&self) -> String {
        match &self.tape.nodes.borrow()[self.index].kind {
            NodeKind::Variable => "var".into(),
            NodeKind::Constant => "const".into(),
            NodeKind::Op { op, .. } => op.name().to_string(),
        }
    }

    /// The tape indices of this node's inputs (empty for a leaf).
    pub fn inputs(&self) -> Vec<usize> {
        match &self.tape.nodes.borrow()[self.index].kind {
            NodeKind::Op { inputs, .. } => inputs.clone(),
            NodeKind::Variable | NodeKind::Constant => Vec::new(),
        }
    }

    /// Whether backward will compute a gradient for this node.
    pub fn requires_grad(&self) -> bool {
        self.tape.requires_grad_of(self.index)
    }

    /// Gradients of this scalar output; see [`Tape::backward`].
    ///
    /// # Errors
    /// As [`Tape::backward`].
    pub fn backward(self) -> Result<Gradients<T>> {
        self.tape.backward(self)
    }

    /// Gradients of this output given its upstream gradient; see [`Tape::backward_with`].
    ///
    /// # Errors
    /// As [`Tape::backward_with`].
    pub fn backward_with<D: Dimension>(self, grad_output: Array<T, D>) -> Result<Gradients<T>> {
        self.tape.backward_with(self, grad_output)
    }
}

mod backward;
mod gradients;
mod graph;

pub use self::backward::BackwardStep;
pub use self::gradients::{Gradients, VarId};
pub use self::graph::GradOptions;

#[cfg(test)]
mod tests;

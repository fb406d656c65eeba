//! The arg-max lanes of [`Max`](super::Max): its backward scatters the gradient to them, and
//! for a recorded backward that scatter and its adjoint, the gather, are ops of their own, each
//! the other's backward.

use ndarray::{ArrayD, ArrayViewD, Axis, IxDyn, Zip};

use crate::ops::arity;
use crate::rule::{Rule, Tensor};
use crate::{BackwardArgs, Element, Function, GraphArgs, Result, Var};

/// One chosen element of each lane along an axis: the arg-max of [`Max`], for its backward.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Lanes<'a> {
    /// The chosen index along `axis`, per lane.
    pub argmax: &'a ArrayD<usize>,
    /// The axis of the lanes.
    pub axis: usize,
    /// Whether the reduced values keep `axis` (of size 1).
    pub keep_dims: bool,
}

impl Lanes<'_> {
    /// `values` (one per lane) written into zeros of `shape` at each lane's chosen index.
    pub(crate) fn scatter<T: Element>(&self, values: &ArrayViewD<'_, T>, shape: &[usize]) -> ArrayD<T> {
        let mut out = ArrayD::zeros(IxDyn(shape));
        let values = if self.keep_dims {
            values.view().index_axis_move(Axis(self.axis), 0)
        } else {
            values.view()
        };
        Zip::from(out.lanes_mut(Axis(self.axis)))
            .and(self.argmax)
            .and(&values)
            .for_each(|mut lane, &i, &v| lane[i] = v);
        out
    }

    /// Each lane's chosen element of `x` (the adjoint of [`scatter`](Lanes::scatter)).
    pub(crate) fn gather<T: Element>(&self, x: &ArrayViewD<'_, T>) -> ArrayD<T> {
        let picked = Zip::from(x.lanes(Axis(self.axis)))
            .and(self.argmax)
            .map_collect(|lane, &i| lane[i]);
        if self.keep_dims {
            picked.insert_axis(Axis(self.axis))
        } else {
            picked
        }
    }
}

/// [`Lanes::scatter`] on the tape, for a recorded backward of [`Max`]; its backward is
/// [`GatherLanes`], and that one's is this.
pub(crate) struct ScatterLanes {
    lanes: LanesOwned,
    shape: Vec<usize>,
}

/// [`Lanes::gather`] on the tape.
pub(crate) struct GatherLanes {
    lanes: LanesOwned,
}

/// [`Lanes`] with its own copy of the indices, for ops the tape keeps.
#[derive(Debug, Clone)]
pub(crate) struct LanesOwned {
    argmax: ArrayD<usize>,
    axis: usize,
    keep_dims: bool,
}

impl LanesOwned {
    pub(crate) fn new(lanes: Lanes<'_>) -> Self {
        LanesOwned {
            argmax: lanes.argmax.clone(),
            axis: lanes.axis,
            keep_dims: lanes.keep_dims,
        }
    }

    fn borrow(&self) -> Lanes<'_> {
        Lanes {
            argmax: &self.argmax,
            axis: self.axis,
            keep_dims: self.keep_dims,
        }
    }
}

impl ScatterLanes {
    pub(crate) fn new(lanes: Lanes<'_>, shape: &[usize]) -> Self {
        ScatterLanes {
            lanes: LanesOwned::new(lanes),
            shape: shape.to_vec(),
        }
    }
}

impl<T: Element> Function<T> for ScatterLanes {
    fn name(&self) -> &str {
        "scatter_lanes"
    }
    fn forward(&mut self, inputs: &[ArrayViewD<'_, T>]) -> Result<ArrayD<T>> {
        arity("scatter_lanes", inputs, 1)?;
        Ok(self.lanes.borrow().scatter(&inputs[0], &self.shape))
    }
    fn backward(&self, args: &BackwardArgs<'_, T>) -> Result<Vec<Option<ArrayD<T>>>> {
        self.eager(args)
    }
    fn backward_graph<'t>(&self, args: &GraphArgs<'_, 't, T>) -> Result<Vec<Option<Var<'t, T>>>> {
        self.graph(args)
    }
    fn saved_bytes(&self) -> usize {
        self.lanes.argmax.len() * std::mem::size_of::<usize>()
    }
}

impl<T: Element> Rule<T> for ScatterLanes {
    fn rule<V: Tensor<T>>(&self, inputs: &[V], output: &V, g: &V, needs: &[bool]) -> Result<Vec<Option<V>>> {
        let _ = (inputs, output);
        needs[0]
            .then(|| g.clone().gathered(self.lanes.borrow()))
            .transpose()
            .map(|g| vec![g])
    }
}

impl<T: Element> Function<T> for GatherLanes {
    fn name(&self) -> &str {
        "gather_lanes"
    }
    fn forward(&mut self, inputs: &[ArrayViewD<'_, T>]) -> Result<ArrayD<T>> {
        arity("gather_lanes", inputs, 1)?;
        Ok(self.lanes.borrow().gather(&inputs[0]))
    }
    fn backward(&self, args: &BackwardArgs<'_, T>) -> Result<Vec<Option<ArrayD<T>>>> {
        self.eager(args)
    }
    fn backward_graph<'t>(&self, args: &GraphArgs<'_, 't, T>) -> Result<Vec<Option<Var<'t, T>>>> {
        self.graph(args)
    }
    fn saved_bytes(&self) -> usize {
        self.lanes.argmax.len() * std::mem::size_of::<usize>()
    }
}

impl<T: Element> Rule<T> for GatherLanes {
    fn rule<V: Tensor<T>>(&self, inputs: &[V], output: &V, g: &V, needs: &[bool]) -> Result<Vec<Option<V>>> {
        let _ = output;
        let shape = inputs[0].dims();
        needs[0]
            .then(|| g.clone().scattered(self.lanes.borrow(), &shape))
            .transpose()
            .map(|g| vec![g])
    }
}

impl GatherLanes {
    pub(crate) fn new(lanes: Lanes<'_>) -> Self {
        GatherLanes {
            lanes: LanesOwned::new(lanes),
        }
    }
}

//! Unfolding and folding whole batches of images (`unfold_array`, `fold_array`: the forward and
//! the backward of [`Unfold`](super::Unfold)), and `Fold` (col2im) as an op, the adjoint of
//! `Unfold`, recorded when the backward of an unfold is itself differentiated. Its own backward
//! is an unfold with zero padding.

use ndarray::{ArrayD, ArrayViewD, IxDyn};

use super::{Window2d, col2im_add, im2col};
use crate::ops::arity;
use crate::ops::shape::element_count;
use crate::rule::{Rule, Tensor};
use crate::{BackwardArgs, Element, Function, GraphArgs, Result, TapeError, Var};

/// `[N, C, H, W]` and the unfolded shape `[N, C·kH·kW, oH·oW]` of an input of `x_shape`, checked.
fn shapes<T>(window: &Window2d, x_shape: &[usize]) -> Result<([usize; 4], [usize; 3])> {
    let [out_h, out_w] = window.output_size("unfold", x_shape)?;
    let &[n, c, h, w] = x_shape else {
        unreachable!("output_size checked the rank");
    };
    let [kh, kw] = window.kernel;
    let out = [n, c, kh, kw, out_h, out_w];
    match element_count::<T>(&out) {
        Some(_) => Ok(([n, c, h, w], [n, c * kh * kw, out_h * out_w])),
        None => Err(TapeError::TooLarge {
            op: "unfold",
            shape: out.to_vec(),
        }),
    }
}

/// The columns of `x` `(N, C, H, W)`: `(N, C·kH·kW, oH·oW)`, padding with `pad`.
pub(crate) fn unfold_array<T: Element>(
    x: &ArrayViewD<'_, T>,
    window: &Window2d,
    pad: T,
) -> Result<ArrayD<T>> {
    let ([n, c, h, w], out_shape) = shapes::<T>(window, x.shape())?;
    let x = x.as_standard_layout();
    let x = x
        .as_slice()
        .unwrap_or_else(|| unreachable!("standard layout is contiguous"));
    let (image_len, per_sample) = (c * h * w, out_shape[1] * out_shape[2]);
    let mut out = vec![pad; n * per_sample];
    if image_len > 0 {
        for (image, cols) in x.chunks_exact(image_len).zip(out.chunks_exact_mut(per_sample)) {
            im2col(image, [c, h, w], window, pad, cols)?;
        }
    }
    Ok(ArrayD::from_shape_vec(IxDyn(&out_shape), out).unwrap_or_else(|_| unreachable!("count checked")))
}

/// Columns `(N, C·kH·kW, oH·oW)` folded back into images of `shape` `(N, C, H, W)`: each
/// column's values added where they came from, the padding's share dropped (col2im).
pub(crate) fn fold_array<T: Element>(
    cols: &ArrayViewD<'_, T>,
    window: &Window2d,
    shape: &[usize],
) -> Result<ArrayD<T>> {
    let ([n, c, h, w], out_shape) = shapes::<T>(window, shape)?;
    if cols.shape() != out_shape {
        return Err(TapeError::Shape {
            op: "fold",
            what: "the columns",
            expected: format!("{out_shape:?} (unfolded {shape:?})"),
            got: cols.shape().to_vec(),
        });
    }
    let g = cols.as_standard_layout();
    let g = g
        .as_slice()
        .unwrap_or_else(|| unreachable!("standard layout is contiguous"));
    let (image_len, per_sample) = (c * h * w, out_shape[1] * out_shape[2]);
    let mut dx = vec![T::zero(); n * image_len];
    if image_len > 0 {
        for (image, cols) in dx.chunks_exact_mut(image_len).zip(g.chunks_exact(per_sample)) {
            col2im_add(cols, [c, h, w], window, image)?;
        }
    }
    Ok(ArrayD::from_shape_vec(IxDyn(&[n, c, h, w]), dx).unwrap_or_else(|_| unreachable!("count checked")))
}

/// Columns `(N, C·kH·kW, oH·oW)` folded into images of `shape` `(N, C, H, W)`. Backward:
/// unfold the gradient (zero padding).
pub struct Fold {
    window: Window2d,
    shape: Vec<usize>,
}

impl Fold {
    /// The fold of columns of this window into images of `shape`.
    pub fn new(window: Window2d, shape: &[usize]) -> Self {
        Fold {
            window,
            shape: shape.to_vec(),
        }
    }
}

impl<T: Element> Function<T> for Fold {
    fn name(&self) -> &str {
        "fold"
    }
    fn forward(&mut self, inputs: &[ArrayViewD<'_, T>]) -> Result<ArrayD<T>> {
        arity("fold", inputs, 1)?;
        fold_array(&inputs[0], &self.window, &self.shape)
    }
    fn backward(&self, args: &BackwardArgs<'_, T>) -> Result<Vec<Option<ArrayD<T>>>> {
        self.eager(args)
    }
    fn backward_graph<'t>(&self, args: &GraphArgs<'_, 't, T>) -> Result<Vec<Option<Var<'t, T>>>> {
        self.graph(args)
    }
}

impl<T: Element> Rule<T> for Fold {
    fn rule<V: Tensor<T>>(&self, inputs: &[V], output: &V, g: &V, needs: &[bool]) -> Result<Vec<Option<V>>> {
        let _ = (inputs, output);
        needs[0]
            .then(|| g.clone().unfolded(&self.window))
            .transpose()
            .map(|g| vec![g])
    }
}

//! 2-D max and average pooling, PyTorch's `max_pool2d` and `avg_pool2d`: fused tape nodes
//! ([`max_pool2d`], [`avg_pool2d`]) with hand-written backwards, the same computations composed
//! from tape primitives ([`max_pool2d_composed`], [`avg_pool2d_composed`]) to check them
//! against, and the layers [`MaxPool2d`] and [`AvgPool2d`].
//!
//! # Shapes
//! `x` is `(N, C, H, W)`; the output is `(N, C, oH, oW)`, with the output size of the
//! [`Window2d`] (`o = ⌊(i + 2·padding - dilation·(k - 1) - 1) / stride⌋ + 1`). Each channel
//! of each sample (a *plane*) is pooled on its own.
//!
//! # The computation, and the derivation of the fused backwards
//! Each output value looks at the `kH · kW` taps of its window, padding included:
//!
//! ```text
//! max:  y[p] = max over taps t of x̃[t]          x̃ is x padded with -∞
//! avg:  y[p] = (Σ over taps t of x̃[t]) / (kH·kW)   x̃ is x padded with 0 (PyTorch's
//!                                                count_include_pad=True: padding counts)
//! ```
//!
//! The derivatives follow at once. A maximum is locally the value of its arg-max `t*(p)`, so
//! `∂y[p]/∂x[t] = 1` if `t = t*(p)`, else 0; an average is a sum scaled by `1/(kH·kW)`. Given the
//! upstream gradient `g = ∂L/∂y`, each input value gathers from every window it lies in:
//!
//! ```text
//! max:  ∂L/∂x[t] = Σ over p with t*(p) = t of g[p]
//! avg:  ∂L/∂x[t] = Σ over p whose window holds t of g[p] / (kH·kW)
//! ```
//!
//! Taps are visited row by row, as PyTorch does; the arg-max is the first maximum, or the
//! first NaN (a NaN propagates). Max pooling keeps the arg-max of each output for backward;
//! average pooling keeps nothing. Planes are split into blocks fixed by the shape, so results
//! are bit-identical on any number of threads.
//!
//! As in PyTorch, the height and width are not 0, and padding is at most half the kernel's span
//! on each axis.

mod layer;
mod node;

pub use tape::ops::unfold::Window2d;
use tape::{Element, TapeError, Var};

pub use self::layer::{AvgPool2d, MaxPool2d};
use self::node::{Kind, PoolNode};
use crate::error::Result;

/// The sizes of a checked pooling.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Geometry {
    /// `N · C`.
    pub planes: usize,
    /// `[H, W]`.
    pub input: [usize; 2],
    /// `[oH, oW]`.
    pub output: [usize; 2],
    pub window: Window2d,
    /// `(N, C)`.
    pub batch: [usize; 2],
}

impl Geometry {
    pub fn taps(&self) -> usize {
        self.window.kernel[0] * self.window.kernel[1]
    }

    pub fn plane_len(&self) -> usize {
        self.input[0] * self.input[1]
    }

    pub fn positions(&self) -> usize {
        self.output[0] * self.output[1]
    }

    pub fn in_shape(&self) -> [usize; 4] {
        [self.batch[0], self.batch[1], self.input[0], self.input[1]]
    }

    pub fn out_shape(&self) -> [usize; 4] {
        [self.batch[0], self.batch[1], self.output[0], self.output[1]]
    }
}

/// Checks a pooling of `x_shape` by `window`, as PyTorch does.
fn check(op: &'static str, x_shape: &[usize], window: &Window2d) -> Result<Geometry> {
    let output = window.output_size(op, x_shape)?;
    if x_shape[2] == 0 || x_shape[3] == 0 {
        return Err(TapeError::Shape {
            op,
            what: "the input",
            expected: "a height and width of at least 1".into(),
            got: x_shape.to_vec(),
        }
        .into());
    }
    for axis in 0..2 {
        let span = window.dilation[axis] * (window.kernel[axis] - 1) + 1;
        if window.padding[axis] > span / 2 {
            return Err(TapeError::InvalidSetting {
                op,
                name: "the padding",
                expected: "at most half the kernel's span (dilation·(kernel - 1) + 1) on each axis",
                got: format!(
                    "padding {:?} for kernel {:?} and dilation {:?}",
                    window.padding, window.kernel, window.dilation
                ),
            }
            .into());
        }
    }
    let [n, c, h, w] = [x_shape[0], x_shape[1], x_shape[2], x_shape[3]];
    Ok(Geometry {
        planes: n * c,
        input: [h, w],
        output,
        window: *window,
        batch: [n, c],
    })
}

/// Max pooling as ONE fused tape node with a hand-written backward (see the
/// [module docs](self)), as PyTorch's `F.max_pool2d`: padding is `-∞`, and the gradient goes to
/// the first maximum of each window.
///
/// PyTorch's `MaxPool2d(k)` has stride `k`: here that is `Window2d::new([k, k]).with_stride([k, k])`,
/// or the [`MaxPool2d`] layer.
///
/// # Shapes
/// `x`: `(N, C, H, W)`; the result: `(N, C, oH, oW)`.
///
/// # Errors
/// [`Error::Tape`](crate::Error::Tape) for an input that is not 4-D or has a height or width of
/// 0, a kernel size, stride or dilation of 0, a kernel larger than the padded input, or padding
/// over half the kernel's span.
///
/// # Example
/// ```
/// use layers::pool::{Window2d, max_pool2d};
/// use ndarray::{Array4, array};
///
/// let tape = tape::Tape::<f64>::new();
/// let x = tape.var(Array4::from_shape_fn((1, 1, 2, 4), |(_, _, h, w)| (4 * h + w) as f64).into_dyn());
/// let y = max_pool2d(x, Window2d::new([2, 2]).with_stride([2, 2]))?;
/// assert_eq!(*y.value(), array![[[[5.0, 7.0]]]].into_dyn());
/// let grads = y.backward_with(array![[[[0.5, -2.0]]]].into_dyn())?;
/// assert_eq!(*grads.wrt(x)?, array![[[[0.0, 0.0, 0.0, 0.0], [0.0, 0.5, 0.0, -2.0]]]].into_dyn());
/// # Ok::<(), layers::Error>(())
/// ```
pub fn max_pool2d<T: Element>(x: Var<'_, T>, window: Window2d) -> Result<Var<'_, T>> {
    let geometry = check("max_pool2d", &x.shape(), &window)?;
    Ok(x.tape().apply(PoolNode::new(Kind::Max, geometry), &[x])?)
}

/// Average pooling as ONE fused tape node with a hand-written backward (see the
/// [module docs](self)), as PyTorch's `F.avg_pool2d` with its default `count_include_pad=True`:
/// every window's sum is divided by `kH · kW`, padding included.
///
/// # Shapes
/// `x`: `(N, C, H, W)`; the result: `(N, C, oH, oW)`.
///
/// # Errors
/// As [`max_pool2d`].
///
/// # Example
/// ```
/// use layers::pool::{Window2d, avg_pool2d};
/// use ndarray::{Array4, array};
///
/// let tape = tape::Tape::<f64>::new();
/// let x = tape.var(Array4::from_elem((1, 1, 2, 2), 4.0).into_dyn());
/// // One zero of padding on the left and right: the edge windows hold two zeros.
/// let y = avg_pool2d(x, Window2d::new([2, 2]).with_stride([2, 2]).with_padding([0, 1]))?;
/// assert_eq!(*y.value(), array![[[[2.0, 2.0]]]].into_dyn());
/// # Ok::<(), layers::Error>(())
/// ```
pub fn avg_pool2d<T: Element>(x: Var<'_, T>, window: Window2d) -> Result<Var<'_, T>> {
    let geometry = check("avg_pool2d", &x.shape(), &window)?;
    Ok(x.tape().apply(PoolNode::new(Kind::Avg, geometry), &[x])?)
}

/// Max pooling composed from tape primitives: unfold with `-∞` padding, then the maximum over
/// each window's taps. The tape derives its gradient; it exists to check [`max_pool2d`] against.
///
/// # Shapes
/// As [`max_pool2d`].
///
/// # Errors
/// As [`max_pool2d`].
pub fn max_pool2d_composed<T: Element>(x: Var<'_, T>, window: Window2d) -> Result<Var<'_, T>> {
    let g = check("max_pool2d", &x.shape(), &window)?;
    Ok(taps(x, &g, T::neg_infinity())?
        .max_axis(2, false)?
        .reshape(&g.out_shape())?)
}

/// Average pooling composed from tape primitives: unfold with zero padding, then the mean over
/// each window's taps. The tape derives its gradient; it exists to check [`avg_pool2d`] against.
///
/// # Shapes
/// As [`avg_pool2d`].
///
/// # Errors
/// As [`avg_pool2d`].
pub fn avg_pool2d_composed<T: Element>(x: Var<'_, T>, window: Window2d) -> Result<Var<'_, T>> {
    let g = check("avg_pool2d", &x.shape(), &window)?;
    Ok(taps(x, &g, T::zero())?
        .mean_axes(&[2], false)?
        .reshape(&g.out_shape())?)
}

/// The windows' taps as `(N, C, kH·kW, L)`, padded with `pad`.
fn taps<'t, T: Element>(x: Var<'t, T>, g: &Geometry, pad: T) -> tape::Result<Var<'t, T>> {
    x.unfold_with_pad(g.window, pad)?
        .reshape(&[g.batch[0], g.batch[1], g.taps(), g.positions()])
}

#[cfg(test)]
mod tests;

//! The fused pooling node: forward and backward one plane (a channel of a sample) at a time,
//! over blocks of planes.

use std::mem::MaybeUninit;
use std::ops::Range;
use std::sync::Arc;

use ndarray::{ArrayD, ArrayViewD, IxDyn};
use tape::{BackwardArgs, Element, Function, GraphArgs, TapeError, Var};

use super::Geometry;
use crate::batch_norm::row_major;
use crate::schedule::{Rows, collect_blocks, collect_blocks_with, on_pool};

/// Which pooling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Max,
    Avg,
}

/// An arg-max that is a padding tap: its gradient goes nowhere.
const PADDING: usize = usize::MAX;

/// The fused pooling of one input. Max pooling saves the arg-max of each output (an index into
/// its plane, or [`PADDING`]). Its recorded backwards share the taps and arg-maxes.
#[derive(Debug, Clone)]
pub(crate) struct PoolNode {
    kind: Kind,
    geometry: Geometry,
    /// The input index under each tap of each window of a plane (row-major over output
    /// positions, then taps), or [`PADDING`]: the same for every plane, so computed once and
    /// only looked up in the inner loops.
    taps: Arc<[usize]>,
    argmax: Arc<[usize]>,
}

impl PoolNode {
    pub(crate) fn new(kind: Kind, geometry: Geometry) -> Self {
        let w = &geometry.window;
        let along = |axis: usize, out: usize, k: usize| {
            (out * w.stride[axis] + k * w.dilation[axis])
                .checked_sub(w.padding[axis])
                .filter(|&at| at < geometry.input[axis])
        };
        let mut taps = Vec::with_capacity(geometry.positions() * geometry.taps());
        for oh in 0..geometry.output[0] {
            for ow in 0..geometry.output[1] {
                for kh in 0..w.kernel[0] {
                    for kw in 0..w.kernel[1] {
                        let at = along(0, oh, kh).zip(along(1, ow, kw));
                        taps.push(at.map_or(PADDING, |(r, c)| r * geometry.input[1] + c));
                    }
                }
            }
        }
        PoolNode {
            kind,
            geometry,
            taps: taps.into(),
            argmax: Arc::from([]),
        }
    }

    /// The outputs as the scheduler's rows: a plane each, every output reading its window.
    fn output_rows(&self) -> Rows {
        Rows {
            count: self.geometry.planes,
            width: self.geometry.positions(),
            work: self.geometry.taps(),
        }
    }

    /// The taps of each window of a plane, in output order.
    fn windows(&self) -> std::slice::ChunksExact<'_, usize> {
        self.taps.chunks_exact(self.geometry.taps())
    }

    /// The outputs of one plane, and for max pooling their arg-maxes (appended to `argmax`).
    fn forward_plane<T: Element>(&self, plane: &[T], out: &mut [MaybeUninit<T>], argmax: &mut Vec<usize>) {
        // `PADDING` is past the end of every plane.
        let value = |tap: usize, pad: T| plane.get(tap).map_or(pad, |&v| v);
        match self.kind {
            Kind::Max => {
                for (window, out) in self.windows().zip(out) {
                    // The first maximum, or the first NaN: as the composed `max_axis`. Which tap
                    // wins is data, unpredictable, so the loop selects by masks and `max`, never
                    // branches: `best_value` is the maximum of the numbers, `nan` whether a NaN
                    // came (`best` is then the first one). The output is the value at `best`.
                    let first = value(window[0], T::neg_infinity());
                    let (mut best, mut best_value, mut nan) = (window[0], first, first.is_nan());
                    for &tap in &window[1..] {
                        let v = value(tap, T::neg_infinity());
                        let take = ((v > best_value) | v.is_nan()) & !nan;
                        best ^= (best ^ tap) & usize::from(take).wrapping_neg();
                        nan |= v.is_nan();
                        best_value = best_value.max(v);
                    }
                    argmax.push(best);
                    out.write(value(best, T::neg_infinity()));
                }
            }
            Kind::Avg => {
                let count = T::from_f64_lossy(self.geometry.taps() as f64);
                for (window, out) in self.windows().zip(out) {
                    let sum = window[1..].iter().fold(value(window[0], T::zero()), |sum, &tap| {
                        sum + value(tap, T::zero())
                    });
                    out.write(sum / count);
                }
            }
        }
    }

    fn forward_values<T: Element>(&mut self, x: &[T]) -> Vec<T> {
        let g = self.geometry;
        let (plane_len, positions) = (g.plane_len(), g.positions());
        let rows = self.output_rows();
        let (out, argmax) = on_pool(rows.parallel(), || {
            collect_blocks_with(rows, |range, out| {
                let mut argmax = Vec::with_capacity(if self.kind == Kind::Max { range.len() } else { 0 });
                let planes = range.start / positions..range.end / positions;
                for (plane, out) in planes.zip(out.chunks_exact_mut(positions)) {
                    self.forward_plane(&x[plane * plane_len..][..plane_len], out, &mut argmax);
                }
                argmax
            })
        });
        if self.kind == Kind::Max {
            self.argmax = argmax.concat().into();
        }
        out
    }

    /// The adjoint of [`backward_values`](Self::backward_values): each output reads the taps of
    /// its window in `a` (an array of the input's shape), the value at the arg-max for max
    /// pooling, the mean for average pooling.
    fn gather_values<T: Element>(&self, a: &[T]) -> Vec<T> {
        let g = self.geometry;
        let (plane_len, positions) = (g.plane_len(), g.positions());
        let rows = self.output_rows();
        on_pool(rows.parallel(), || {
            collect_blocks(rows, |range, out| {
                let planes = range.start / positions..range.end / positions;
                for (plane, out) in planes.zip(out.chunks_exact_mut(positions)) {
                    let a = &a[plane * plane_len..][..plane_len];
                    match self.kind {
                        Kind::Max => {
                            let argmax = &self.argmax[plane * positions..][..positions];
                            for (out, &i) in out.iter_mut().zip(argmax) {
                                out.write(a.get(i).copied().unwrap_or(T::zero()));
                            }
                        }
                        Kind::Avg => self.forward_plane(a, out, &mut Vec::new()),
                    }
                }
            })
        })
    }

    /// `∂L/∂x` of one plane from its outputs' gradients `dout`, into `dx` (zeroed here).
    fn backward_plane<T: Element>(&self, plane: usize, dout: &[T], dx: &mut [T]) {
        dx.fill(T::zero());
        let positions = self.geometry.positions();
        match self.kind {
            Kind::Max => {
                for (&i, &g) in self.argmax[plane * positions..][..positions].iter().zip(dout) {
                    if i != PADDING {
                        dx[i] = dx[i] + g;
                    }
                }
            }
            Kind::Avg => {
                let count = T::from_f64_lossy(self.geometry.taps() as f64);
                for (window, &g) in self.windows().zip(dout) {
                    for &tap in window.iter().filter(|&&tap| tap != PADDING) {
                        dx[tap] = dx[tap] + g / count;
                    }
                }
            }
        }
    }

    fn backward_values<T: Element>(&self, dout: &[T]) -> Vec<T> {
        let g = self.geometry;
        let (plane_len, positions) = (g.plane_len(), g.positions());
        let rows = Rows {
            count: g.planes,
            width: plane_len,
            work: (g.taps() * positions).div_ceil(plane_len.max(1)).max(1),
        };
        on_pool(rows.parallel(), || {
            collect_blocks(rows, |range: Range<usize>, dx| {
                let mut buffer = vec![T::zero(); plane_len];
                let planes = range.start / plane_len..range.end / plane_len;
                for (plane, dx) in planes.zip(dx.chunks_exact_mut(plane_len)) {
                    self.backward_plane(plane, &dout[plane * positions..][..positions], &mut buffer);
                    for (dx, &v) in dx.iter_mut().zip(&buffer) {
                        dx.write(v);
                    }
                }
            })
        })
    }
}

impl<T: Element> Function<T> for PoolNode {
    fn name(&self) -> &str {
        match self.kind {
            Kind::Max => "max_pool2d",
            Kind::Avg => "avg_pool2d",
        }
    }

    fn rule(&self) -> &str {
        match self.kind {
            Kind::Max => "max_pool2d (fused): ∂/∂x = g at each window's arg-max, added where windows overlap",
            Kind::Avg => "avg_pool2d (fused): ∂/∂x = g / (kH·kW) on every tap of each window",
        }
    }

    fn forward(&mut self, inputs: &[ArrayViewD<'_, T>]) -> tape::Result<ArrayD<T>> {
        let [x] = inputs else {
            return Err(TapeError::Arity {
                op: "pool2d",
                expected: 1,
                got: inputs.len(),
            });
        };
        let out = self.forward_values(&row_major(x));
        Ok(ArrayD::from_shape_vec(IxDyn(&self.geometry.out_shape()), out)
            .unwrap_or_else(|_| unreachable!("one value per output element")))
    }

    fn backward(&self, args: &BackwardArgs<'_, T>) -> tape::Result<Vec<Option<ArrayD<T>>>> {
        if !args.needs_grad[0] {
            return Ok(vec![None]);
        }
        let dx = self.backward_values(&row_major(&args.grad_output));
        Ok(vec![Some(
            ArrayD::from_shape_vec(args.inputs[0].raw_dim(), dx)
                .unwrap_or_else(|_| unreachable!("one value per input element")),
        )])
    }

    /// One fused node, the scatter of `∂L/∂y` onto the taps (see [`PoolAdjoint`]).
    fn backward_graph<'t>(&self, args: &GraphArgs<'_, 't, T>) -> tape::Result<Vec<Option<Var<'t, T>>>> {
        if !args.needs_grad[0] {
            return Ok(vec![None]);
        }
        let scatter = PoolAdjoint {
            pool: self.clone(),
            scatter: true,
        };
        let grad = args.grad_output;
        Ok(vec![Some(grad.tape().apply(scatter, &[grad])?)])
    }

    fn saved_bytes(&self) -> usize {
        self.argmax.len() * std::mem::size_of::<usize>()
    }
}

/// The two linear maps of a pooling's recorded backwards, each the other's adjoint (and so its
/// backward): the scatter, `∂L/∂y` onto the taps it came from (the pooling's backward, a map
/// from the output's shape to the input's), and the gather, each output position reading its
/// window (at the arg-max for max pooling, the mean for average pooling). Neither depends on
/// `x` (the arg-max is fixed), so pooling differentiates to any order, with second
/// derivatives 0. They share the pooling's taps and arg-maxes.
pub(crate) struct PoolAdjoint {
    pool: PoolNode,
    scatter: bool,
}

impl<T: Element> Function<T> for PoolAdjoint {
    fn name(&self) -> &str {
        match (self.pool.kind, self.scatter) {
            (Kind::Max, true) => "max_pool2d_backward",
            (Kind::Max, false) => "max_pool2d_gather",
            (Kind::Avg, true) => "avg_pool2d_backward",
            (Kind::Avg, false) => "avg_pool2d_gather",
        }
    }

    fn forward(&mut self, inputs: &[ArrayViewD<'_, T>]) -> tape::Result<ArrayD<T>> {
        let g = self.pool.geometry;
        let (from, to) = if self.scatter {
            (g.out_shape(), g.in_shape())
        } else {
            (g.in_shape(), g.out_shape())
        };
        let [a] = inputs else {
            return Err(TapeError::Arity {
                op: "pool2d_backward",
                expected: 1,
                got: inputs.len(),
            });
        };
        if a.shape() != from {
            return Err(TapeError::Shape {
                op: "pool2d_backward",
                what: "the input",
                expected: format!("{from:?}"),
                got: a.shape().to_vec(),
            });
        }
        let a = row_major(a);
        let out = if self.scatter {
            self.pool.backward_values(&a)
        } else {
            self.pool.gather_values(&a)
        };
        Ok(ArrayD::from_shape_vec(IxDyn(&to), out).unwrap_or_else(|_| unreachable!("one value per element")))
    }

    fn backward(&self, args: &BackwardArgs<'_, T>) -> tape::Result<Vec<Option<ArrayD<T>>>> {
        let mut adjoint = self.adjoint();
        Ok(vec![
            args.needs_grad[0]
                .then(|| adjoint.forward(&[args.grad_output.view()]))
                .transpose()?,
        ])
    }

    fn backward_graph<'t>(&self, args: &GraphArgs<'_, 't, T>) -> tape::Result<Vec<Option<Var<'t, T>>>> {
        if !args.needs_grad[0] {
            return Ok(vec![None]);
        }
        let grad = args.grad_output;
        Ok(vec![Some(grad.tape().apply(self.adjoint(), &[grad])?)])
    }
}

impl PoolAdjoint {
    fn adjoint(&self) -> PoolAdjoint {
        PoolAdjoint {
            pool: self.pool.clone(),
            scatter: !self.scatter,
        }
    }
}

//! The fused pooling node: forward and backward one plane (a channel of a sample) at a time,
//! over blocks of planes.

use std::mem::MaybeUninit;
use std::ops::Range;

use ndarray::{ArrayD, ArrayViewD, IxDyn};
use tape::{BackwardArgs, Element, Function, TapeError};

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
/// its plane, or [`PADDING`]).
pub(crate) struct PoolNode {
    kind: Kind,
    geometry: Geometry,
    argmax: Vec<usize>,
}

impl PoolNode {
    pub(crate) fn new(kind: Kind, geometry: Geometry) -> Self {
        PoolNode {
            kind,
            geometry,
            argmax: Vec::new(),
        }
    }

    /// `visit(p, k, tap)` for each output position `p` of a plane and each tap `k` of its
    /// window, in row-major order of both: `tap` is the index of the tap's input value in the
    /// plane, or `None` for padding.
    fn for_each_tap(&self, mut visit: impl FnMut(usize, usize, Option<usize>)) {
        let g = &self.geometry;
        let w = &g.window;
        let [h, width] = g.input;
        let along = |axis: usize, out: usize, k: usize, size: usize| {
            (out * w.stride[axis] + k * w.dilation[axis])
                .checked_sub(w.padding[axis])
                .filter(|&i| i < size)
        };
        for oh in 0..g.output[0] {
            for ow in 0..g.output[1] {
                let p = oh * g.output[1] + ow;
                for kh in 0..w.kernel[0] {
                    let row = along(0, oh, kh, h);
                    for kw in 0..w.kernel[1] {
                        let tap = row.zip(along(1, ow, kw, width)).map(|(r, c)| r * width + c);
                        visit(p, kh * w.kernel[1] + kw, tap);
                    }
                }
            }
        }
    }

    /// The outputs of one plane, and for max pooling their arg-maxes (appended to `argmax`).
    fn forward_plane<T: Element>(&self, plane: &[T], out: &mut [MaybeUninit<T>], argmax: &mut Vec<usize>) {
        let last = self.geometry.taps() - 1;
        let value = |tap: Option<usize>, pad: T| tap.map_or(pad, |i| plane[i]);
        match self.kind {
            Kind::Max => {
                let mut best = (PADDING, T::neg_infinity());
                self.for_each_tap(|p, k, tap| {
                    let v = value(tap, T::neg_infinity());
                    // The first maximum, or the first NaN: as the composed `max_axis`.
                    if k == 0 || v > best.1 || (v.is_nan() && !best.1.is_nan()) {
                        best = (tap.unwrap_or(PADDING), v);
                    }
                    if k == last {
                        argmax.push(best.0);
                        out[p].write(best.1);
                    }
                });
            }
            Kind::Avg => {
                let count = T::from_f64_lossy((last + 1) as f64);
                let mut sum = T::zero();
                self.for_each_tap(|p, k, tap| {
                    let v = value(tap, T::zero());
                    sum = if k == 0 { v } else { sum + v };
                    if k == last {
                        out[p].write(sum / count);
                    }
                });
            }
        }
    }

    fn forward_values<T: Element>(&mut self, x: &[T]) -> Vec<T> {
        let g = self.geometry;
        let (plane_len, positions) = (g.plane_len(), g.positions());
        let rows = Rows {
            count: g.planes,
            width: positions,
            work: g.taps(),
        };
        let (out, argmax) = on_pool(rows.parallel(), || {
            collect_blocks_with(rows, |range, out| {
                let mut argmax = Vec::new();
                let planes = range.start / positions..range.end / positions;
                for (plane, out) in planes.zip(out.chunks_exact_mut(positions)) {
                    self.forward_plane(&x[plane * plane_len..][..plane_len], out, &mut argmax);
                }
                argmax
            })
        });
        if self.kind == Kind::Max {
            self.argmax = argmax.concat();
        }
        out
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
                self.for_each_tap(|p, _, tap| {
                    if let Some(i) = tap {
                        dx[i] = dx[i] + dout[p] / count;
                    }
                });
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

    fn saved_bytes(&self) -> usize {
        self.argmax.len() * std::mem::size_of::<usize>()
    }
}

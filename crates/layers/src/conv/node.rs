//! The fused convolution node: its forward and backward as matrix products on one sample's
//! columns at a time, over blocks of samples.

use std::mem::MaybeUninit;
use std::ops::Range;

use ndarray::linalg::general_mat_mul;
use ndarray::{ArrayD, ArrayView2, ArrayViewD, ArrayViewMut2, IxDyn};
use tape::ops::unfold::{Window2d, col2im_add, im2col};
use tape::{BackwardArgs, Element, Function, GraphArgs, TapeError, Var};

use super::double::Conv2dBackward;

use crate::batch_norm::row_major;
use crate::schedule::{Rows, collect_blocks, collect_blocks_with, fold_blocks, on_pool};

/// The sizes of a checked convolution.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Geometry {
    pub n: usize,
    pub c_in: usize,
    /// `[H, W]` of the input.
    pub input: [usize; 2],
    pub c_out: usize,
    pub groups: usize,
    pub window: Window2d,
    /// `[oH, oW]` of the output.
    pub output: [usize; 2],
}

impl Geometry {
    /// Rows of one group's columns, the inner size of its products: `C_in/G · kH · kW`.
    pub fn rows_per_group(&self) -> usize {
        self.c_in / self.groups * self.window.kernel[0] * self.window.kernel[1]
    }

    fn out_per_group(&self) -> usize {
        self.c_out / self.groups
    }

    /// Output positions `L = oH · oW`.
    fn positions(&self) -> usize {
        self.output[0] * self.output[1]
    }

    fn chw(&self) -> [usize; 3] {
        [self.c_in, self.input[0], self.input[1]]
    }

    fn image_len(&self) -> usize {
        self.c_in * self.input[0] * self.input[1]
    }

    fn out_len(&self) -> usize {
        self.c_out * self.positions()
    }

    fn cols_len(&self) -> usize {
        self.groups * self.rows_per_group() * self.positions()
    }

    /// The output's shape, `(N, C_out, oH, oW)`.
    pub fn output_shape(&self) -> [usize; 4] {
        [self.n, self.c_out, self.output[0], self.output[1]]
    }

    /// The input's shape, `(N, C_in, H, W)`.
    pub fn input_shape(&self) -> [usize; 4] {
        [self.n, self.c_in, self.input[0], self.input[1]]
    }

    /// The weight's shape, `(C_out, C_in / G, kH, kW)`.
    pub fn weight_shape(&self) -> [usize; 4] {
        let k = self.window.kernel;
        [self.c_out, self.c_in / self.groups, k[0], k[1]]
    }

    pub fn input_len(&self) -> usize {
        self.n * self.image_len()
    }

    pub fn weight_len(&self) -> usize {
        self.c_out * self.rows_per_group()
    }
}

/// `rows × cols` matrices over slices of exactly that length.
fn matrix<T>(values: &[T], rows: usize, cols: usize) -> ArrayView2<'_, T> {
    ArrayView2::from_shape((rows, cols), values).unwrap_or_else(|_| unreachable!("the sizes were checked"))
}

fn matrix_mut<T>(values: &mut [T], rows: usize, cols: usize) -> ArrayViewMut2<'_, T> {
    ArrayViewMut2::from_shape((rows, cols), values).unwrap_or_else(|_| unreachable!("the sizes were checked"))
}

/// The fused convolution: inputs `x`, `weight` and optionally `bias`; no saved state (backward
/// unfolds `x` again).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Conv2dNode {
    geometry: Geometry,
}

/// One block's share of the parameter gradients (or all of them, summed).
pub(crate) struct Partial<T> {
    pub dweight: Vec<T>,
    pub dbias: Vec<f64>,
}

impl<T: Element> Partial<T> {
    fn add(&mut self, other: Partial<T>) {
        for (total, part) in self.dweight.iter_mut().zip(other.dweight) {
            *total = *total + part;
        }
        for (total, part) in self.dbias.iter_mut().zip(other.dbias) {
            *total += part;
        }
    }
}

impl Conv2dNode {
    pub(crate) fn new(geometry: Geometry) -> Self {
        Conv2dNode { geometry }
    }

    pub(crate) fn geometry(&self) -> Geometry {
        self.geometry
    }

    /// `product = W · cols` for each group of one sample.
    fn multiply<T: Element>(&self, weight: &[T], cols: &[T], product: &mut [T]) {
        let g = &self.geometry;
        let (inner, outs, positions) = (g.rows_per_group(), g.out_per_group(), g.positions());
        for group in 0..g.groups {
            let w = matrix(&weight[group * outs * inner..][..outs * inner], outs, inner);
            let c = matrix(
                &cols[group * inner * positions..][..inner * positions],
                inner,
                positions,
            );
            let mut p = matrix_mut(
                &mut product[group * outs * positions..][..outs * positions],
                outs,
                positions,
            );
            general_mat_mul(T::one(), &w, &c, T::zero(), &mut p);
        }
    }

    pub(crate) fn forward_values<T: Element>(&self, x: &[T], weight: &[T], bias: Option<&[T]>) -> Vec<T> {
        let g = self.geometry;
        let (image_len, out_len, positions) = (g.image_len(), g.out_len(), g.positions());
        let rows = Rows {
            count: g.n,
            width: out_len,
            work: g.rows_per_group().max(1),
        };
        on_pool(rows.parallel(), || {
            collect_blocks(rows, |range, out| {
                let (mut cols, mut product) = (vec![T::zero(); g.cols_len()], vec![T::zero(); out_len]);
                let first = range.start / out_len;
                for (sample, out) in (first..).zip(out.chunks_exact_mut(out_len)) {
                    unfold(&g, &x[sample * image_len..][..image_len], &mut cols);
                    self.multiply(weight, &cols, &mut product);
                    let rows = out
                        .chunks_exact_mut(positions)
                        .zip(product.chunks_exact(positions));
                    for (channel, (out, product)) in rows.enumerate() {
                        let b = bias.map_or(T::zero(), |b| b[channel]);
                        for (out, &p) in out.iter_mut().zip(product) {
                            out.write(p + b);
                        }
                    }
                }
            })
        })
    }

    /// The gradients `[dx, dweight, dbias]` where `needed`.
    pub(crate) fn backward_values<T: Element>(
        &self,
        x: &[T],
        weight: &[T],
        dout: &[T],
        needed: [bool; 3],
    ) -> (Option<Vec<T>>, Partial<T>) {
        let g = self.geometry;
        let [need_dx, need_dweight, need_dbias] = needed;
        let empty = Partial {
            dweight: vec![T::zero(); if need_dweight { weight.len() } else { 0 }],
            dbias: vec![0.0; if need_dbias { g.c_out } else { 0 }],
        };
        if g.image_len() == 0 {
            // No input values: the output is the bias, and only its gradient is not zero.
            let mut sums = empty;
            for sample in dout.chunks_exact(g.out_len().max(1)) {
                self.add_bias_sums(sample, &mut sums.dbias);
            }
            return (need_dx.then(|| vec![T::zero(); x.len()]), sums);
        }
        // The same blocks whichever gradients are needed, so each result is the same too.
        let products_per_value = (2 * g.out_len() * g.rows_per_group()).div_ceil(g.image_len());
        let rows = Rows {
            count: g.n,
            width: g.image_len(),
            work: products_per_value.max(1),
        };
        let block = |samples: Range<usize>, dx: Option<&mut [MaybeUninit<T>]>| {
            self.backward_block(x, weight, dout, samples, dx, [need_dweight, need_dbias])
        };
        let samples_of = |range: Range<usize>| range.start / g.image_len()..range.end / g.image_len();
        on_pool(rows.parallel(), || {
            if need_dx {
                let (dx, partials) =
                    collect_blocks_with(rows, |range, dx| block(samples_of(range), Some(dx)));
                let mut sums = empty;
                partials.into_iter().for_each(|partial| sums.add(partial));
                (Some(dx), sums)
            } else {
                let sums = fold_blocks(rows, |range| block(samples_of(range), None), Partial::add);
                (None, sums.unwrap_or(empty))
            }
        })
    }

    /// The parameter gradients of the block's samples, and their `dx` when `dx` is given.
    fn backward_block<T: Element>(
        &self,
        x: &[T],
        weight: &[T],
        dout: &[T],
        samples: Range<usize>,
        mut dx: Option<&mut [MaybeUninit<T>]>,
        [need_dweight, need_dbias]: [bool; 2],
    ) -> Partial<T> {
        let g = self.geometry;
        let (image_len, out_len) = (g.image_len(), g.out_len());
        let (inner, outs, positions) = (g.rows_per_group(), g.out_per_group(), g.positions());
        let mut partial = Partial {
            dweight: vec![T::zero(); if need_dweight { weight.len() } else { 0 }],
            dbias: vec![0.0; if need_dbias { g.c_out } else { 0 }],
        };
        let mut cols = vec![T::zero(); g.cols_len()];
        let mut image = vec![T::zero(); if dx.is_some() { image_len } else { 0 }];
        for (i, sample) in samples.enumerate() {
            let dout = &dout[sample * out_len..][..out_len];
            if need_dbias {
                self.add_bias_sums(dout, &mut partial.dbias);
            }
            let group_dout = |group: usize| {
                matrix(
                    &dout[group * outs * positions..][..outs * positions],
                    outs,
                    positions,
                )
            };
            if need_dweight {
                // ∂L/∂W[g] += G_Y[g] · cols[g]ᵀ
                unfold(&g, &x[sample * image_len..][..image_len], &mut cols);
                for group in 0..g.groups {
                    let c = matrix(
                        &cols[group * inner * positions..][..inner * positions],
                        inner,
                        positions,
                    );
                    let mut dw = matrix_mut(
                        &mut partial.dweight[group * outs * inner..][..outs * inner],
                        outs,
                        inner,
                    );
                    general_mat_mul(T::one(), &group_dout(group), &c.t(), T::one(), &mut dw);
                }
            }
            if let Some(dx) = dx.as_deref_mut() {
                // ∂L/∂cols[g] = W[g]ᵀ · G_Y[g], folded back onto the image.
                for group in 0..g.groups {
                    let w = matrix(&weight[group * outs * inner..][..outs * inner], outs, inner);
                    let mut c = matrix_mut(
                        &mut cols[group * inner * positions..][..inner * positions],
                        inner,
                        positions,
                    );
                    general_mat_mul(T::one(), &w.t(), &group_dout(group), T::zero(), &mut c);
                }
                image.fill(T::zero());
                col2im_add(&cols, g.chw(), &g.window, &mut image)
                    .unwrap_or_else(|e| unreachable!("conv2d checked the geometry: {e}"));
                for (out, &value) in dx[i * image_len..][..image_len].iter_mut().zip(&image) {
                    out.write(value);
                }
            }
        }
        partial
    }

    /// Adds each output channel's sum of one sample's `dout` to `sums`, in f64.
    fn add_bias_sums<T: Element>(&self, dout: &[T], sums: &mut [f64]) {
        let positions = self.geometry.positions();
        for (sum, row) in sums.iter_mut().zip(dout.chunks_exact(positions)) {
            *sum += row.iter().map(|g| g.as_f64()).sum::<f64>();
        }
    }
}

/// One sample's columns (the geometry was checked, so the buffers fit).
fn unfold<T: Element>(g: &Geometry, image: &[T], cols: &mut [T]) {
    im2col(image, g.chw(), &g.window, T::zero(), cols)
        .unwrap_or_else(|e| unreachable!("conv2d checked the geometry: {e}"));
}

impl<T: Element> Function<T> for Conv2dNode {
    fn name(&self) -> &str {
        "conv2d"
    }

    fn rule(&self) -> &str {
        "conv2d (fused): ∂/∂W = Σ g·colsᵀ, ∂/∂x = fold(Wᵀ·g), ∂/∂b = Σ g"
    }

    fn forward(&mut self, inputs: &[ArrayViewD<'_, T>]) -> tape::Result<ArrayD<T>> {
        let (x, weight, bias) = match inputs {
            [x, weight] => (x, weight, None),
            [x, weight, bias] => (x, weight, Some(row_major(bias))),
            _ => {
                return Err(TapeError::Arity {
                    op: "conv2d",
                    expected: 3,
                    got: inputs.len(),
                });
            }
        };
        let out = self.forward_values(&row_major(x), &row_major(weight), bias.as_deref());
        Ok(ArrayD::from_shape_vec(IxDyn(&self.geometry.output_shape()), out)
            .unwrap_or_else(|_| unreachable!("one value per output element")))
    }

    fn backward(&self, args: &BackwardArgs<'_, T>) -> tape::Result<Vec<Option<ArrayD<T>>>> {
        let (x, weight) = (&args.inputs[0], &args.inputs[1]);
        let needed = [
            args.needs_grad[0],
            args.needs_grad[1],
            args.needs_grad.get(2).copied().unwrap_or(false),
        ];
        let (dx, sums) = self.backward_values(
            &row_major(x),
            &row_major(weight),
            &row_major(&args.grad_output),
            needed,
        );
        let shaped = |values: Vec<T>, shape: &[usize]| {
            ArrayD::from_shape_vec(IxDyn(shape), values)
                .unwrap_or_else(|_| unreachable!("one value per element"))
        };
        let mut grads = vec![
            dx.map(|dx| shaped(dx, x.shape())),
            needed[1].then(|| shaped(sums.dweight, weight.shape())),
        ];
        if args.inputs.len() == 3 {
            let dbias = sums.dbias.iter().map(|&v| T::from_f64_lossy(v)).collect();
            grads.push(needed[2].then(|| shaped(dbias, &[self.geometry.c_out])));
        }
        Ok(grads)
    }

    /// One fused node, `conv2d_backward`, whose own backward is made of convolutions (see the
    /// [module docs](super#the-double-backward)).
    fn backward_graph<'t>(&self, args: &GraphArgs<'_, 't, T>) -> tape::Result<Vec<Option<Var<'t, T>>>> {
        let bias = args.inputs.len() == 3;
        let node = Conv2dBackward { conv: *self, bias };
        node.record(
            (args.inputs[0], args.inputs[1], args.grad_output),
            args.needs_grad,
        )
    }
}

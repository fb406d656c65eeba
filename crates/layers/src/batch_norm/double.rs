//! BatchNorm's backward as ONE fused node, so that it can be differentiated again: what
//! [`BatchNormNode`](super::BatchNormNode) records when its backward is recorded
//! ([`tape::Tape::grad`] with `create_graph`). Its own backward is the closed-form double
//! backward derived in the [module docs](super#the-double-backward).
//!
//! The node's inputs are `x`, `gamma` and the upstream gradient `g`; its output is `dx`,
//! `dgamma` and `dbeta` concatenated (flat), which [`Var::split`] hands out as three `Var`s.
//! It saves what the first node saved: each channel's mean and inverse standard deviation.

use std::ops::Range;

use ndarray::{ArrayD, ArrayViewD, IxDyn};
use tape::{BackwardArgs, Element, Function, GraphArgs, TapeError, Var};

use super::kernel::{self, Dims, Saved};
use super::{row_major, to_f64};
use crate::schedule::{Rows, collect_blocks, fold_blocks, on_pool};

#[cfg(test)]
mod tests;

/// The recorded backward of a [`BatchNormNode`](super::BatchNormNode): inputs `x`, `gamma`,
/// `g`; output `[dx, dgamma, dbeta]`, flat. Made by the node's `backward_graph`.
#[derive(Debug, Clone)]
pub(crate) struct BatchNormBackward {
    pub mean: Vec<f64>,
    pub inv_std: Vec<f64>,
    pub batch_stats: bool,
}

impl BatchNormBackward {
    fn saved<'a>(&'a self, gamma: &'a [f64]) -> Saved<'a> {
        Saved {
            gamma,
            mean: &self.mean,
            inv_std: &self.inv_std,
            batch_stats: self.batch_stats,
        }
    }

    /// Records this node on `x`'s tape and splits its result into the three gradients (where
    /// `needs` asks for them).
    pub fn record<'t, T: Element>(
        self,
        args: &GraphArgs<'_, 't, T>,
    ) -> tape::Result<Vec<Option<Var<'t, T>>>> {
        let [x, gamma, _] = args.inputs else {
            return Err(TapeError::op("batch_norm", "backward takes the 3 forward inputs"));
        };
        let channels = vec![self.mean.len()];
        let flat = x.tape().apply(self, &[*x, *gamma, args.grad_output])?;
        let parts = flat.split(&[x.shape(), channels.clone(), channels])?;
        Ok(parts
            .into_iter()
            .zip(args.needs_grad)
            .map(|(part, &needed)| needed.then_some(part))
            .collect())
    }
}

impl<T: Element> Function<T> for BatchNormBackward {
    fn name(&self) -> &str {
        "batch_norm_backward"
    }

    /// BatchNorm's first-order backward, `[dx, dgamma, dbeta]`.
    fn forward(&mut self, inputs: &[ArrayViewD<'_, T>]) -> tape::Result<ArrayD<T>> {
        let [x, gamma, g] = inputs else {
            return Err(TapeError::op(
                "batch_norm_backward",
                format!("takes 3 inputs (x, gamma, dout), got {}", inputs.len()),
            ));
        };
        check_shapes(x.shape(), gamma.shape(), g.shape(), self.mean.len())?;
        let gamma = to_f64(gamma);
        let dims = Dims::of(x.shape());
        let grads = kernel::backward(&row_major(g), &row_major(x), dims, self.saved(&gamma), true);
        let mut flat = grads.dx.unwrap_or_default();
        flat.extend(
            grads
                .dgamma
                .iter()
                .chain(&grads.dbeta)
                .map(|&v| T::from_f64_lossy(v)),
        );
        Ok(ArrayD::from_shape_vec(IxDyn(&[flat.len()]), flat)
            .unwrap_or_else(|_| unreachable!("a flat vector has its own length")))
    }

    /// The double backward: the gradients of `Σ A·dx + Σ b·dgamma + Σ c·dbeta` with respect to
    /// `x`, `gamma` and `g`, where `[A, b, c]` is the upstream gradient.
    fn backward(&self, args: &BackwardArgs<'_, T>) -> tape::Result<Vec<Option<ArrayD<T>>>> {
        let [x, gamma, g] = args.inputs else {
            return Err(TapeError::op(
                "batch_norm_backward",
                "backward takes the 3 forward inputs",
            ));
        };
        let dims = Dims::of(x.shape());
        let upstream = row_major(&args.grad_output);
        let (a, rest) = upstream.split_at(x.len());
        let (b, c) = rest.split_at(dims.c);
        let gamma = to_f64(gamma);
        let (x_values, g_values) = (row_major(x), row_major(g));
        let inputs = Inputs {
            x: &x_values,
            g: &g_values,
            a,
            dims,
        };
        let grads = on_pool(dims_rows(dims).parallel(), || {
            double_backward(&inputs, self.saved(&gamma), (b, c), args.needs_grad)
        });
        let shaped = |values: Vec<T>, shape: &[usize]| {
            ArrayD::from_shape_vec(IxDyn(shape), values).unwrap_or_else(|_| unreachable!("counts match"))
        };
        Ok(vec![
            grads.x.map(|v| shaped(v, x.shape())),
            grads.gamma.map(|v| shaped(v, &[dims.c])),
            grads.g.map(|v| shaped(v, x.shape())),
        ])
    }

    fn saved_bytes(&self) -> usize {
        (self.mean.len() + self.inv_std.len()) * std::mem::size_of::<f64>()
    }
}

fn check_shapes(x: &[usize], gamma: &[usize], g: &[usize], channels: usize) -> tape::Result<()> {
    let dims_ok = x.len() >= 2 && x[1] == channels && gamma == [channels];
    if !dims_ok || g != x {
        return Err(TapeError::op(
            "batch_norm_backward",
            format!(
                "inputs of shapes x {x:?}, gamma {gamma:?}, dout {g:?}; expected x (N, {channels}, *), gamma [{channels}], dout as x"
            ),
        ));
    }
    Ok(())
}

/// The row-major arrays of the double backward: `x`, the first upstream gradient `g`, and `A`,
/// the part of the second upstream gradient that reaches `dx`.
struct Inputs<'a, T> {
    x: &'a [T],
    g: &'a [T],
    a: &'a [T],
    dims: Dims,
}

/// What [`double_backward`] returns, each when asked for.
struct DoubleGrads<T> {
    x: Option<Vec<T>>,
    gamma: Option<Vec<T>>,
    g: Option<Vec<T>>,
}

/// Per-channel sums over the `M` values: `Σ g`, `Σ g x̂`, `Σ A`, `Σ A x̂`, `Σ A g`.
type Sums = [f64; 5];

/// Per-channel coefficients of an output that is `p·A + q·g + s·x̂ + t` elementwise.
#[derive(Debug, Clone, Copy, Default)]
struct Linear {
    p: f64,
    q: f64,
    s: f64,
    t: f64,
}

fn double_backward<T: Element>(
    inputs: &Inputs<'_, T>,
    saved: Saved<'_>,
    (b, c): (&[T], &[T]),
    needs: &[bool],
) -> DoubleGrads<T> {
    let dims = inputs.dims;
    if inputs.x.is_empty() {
        // No values: every gradient is zero (and there is no mean to divide by).
        let zeros = |len| vec![T::zero(); len];
        return DoubleGrads {
            x: needs[0].then(|| zeros(0)),
            gamma: needs[1].then(|| zeros(dims.c)),
            g: needs[2].then(|| zeros(0)),
        };
    }
    let rows = dims_rows(dims);
    let sums = fold_blocks(
        rows,
        |range| block_sums(inputs, saved, range),
        |total, block| {
            for (t, b) in total.iter_mut().zip(block) {
                for (t, b) in t.iter_mut().zip(b) {
                    *t += b;
                }
            }
        },
    )
    .unwrap_or_else(|| vec![[0.0; 5]; dims.c]);
    let m = dims.per_channel() as f64;
    let mut dgamma = Vec::with_capacity(dims.c);
    let mut for_x = Vec::with_capacity(dims.c);
    let mut for_g = Vec::with_capacity(dims.c);
    for channel in 0..dims.c {
        let [g_mean, m2, a_mean, ax, ag] = sums[channel].map(|sum| sum / m);
        let (gamma, r) = (saved.gamma[channel], saved.inv_std[channel]);
        let (b, c) = (b[channel].as_f64(), c[channel].as_f64());
        if saved.batch_stats {
            let (gr, grr) = (gamma * r, gamma * r * r);
            let covariance = ag - a_mean * g_mean;
            dgamma.push(m * r * (covariance - ax * m2));
            for_x.push(Linear {
                p: -grr * m2,
                q: b * r - grr * ax,
                s: grr * (3.0 * ax * m2 - covariance) - b * r * m2,
                t: grr * (m2 * a_mean + ax * g_mean) - b * r * g_mean,
            });
            for_g.push(Linear {
                p: gr,
                q: 0.0,
                s: b - gr * ax,
                t: c - gr * a_mean,
            });
        } else {
            dgamma.push(m * r * ag);
            for_x.push(Linear {
                q: b * r,
                ..Linear::default()
            });
            for_g.push(Linear {
                p: gamma * r,
                q: 0.0,
                s: b,
                t: c,
            });
        }
    }
    let write = |coefficients: &[Linear]| linear_output(inputs, saved, coefficients);
    DoubleGrads {
        x: needs[0].then(|| write(&for_x)),
        gamma: needs[1].then(|| dgamma.iter().map(|&v| T::from_f64_lossy(v)).collect()),
        g: needs[2].then(|| write(&for_g)),
    }
}

fn dims_rows(dims: Dims) -> Rows {
    Rows::new(dims.n, dims.c * dims.s)
}

/// [`Sums`] of each channel over the rows of `range`.
fn block_sums<T: Element>(inputs: &Inputs<'_, T>, saved: Saved<'_>, range: Range<usize>) -> Vec<Sums> {
    let Inputs { x, g, a, dims } = inputs;
    let mut sums = vec![[0.0; 5]; dims.c];
    let rows = x[range.clone()]
        .chunks_exact(dims.c * dims.s)
        .zip(g[range.clone()].chunks_exact(dims.c * dims.s))
        .zip(a[range].chunks_exact(dims.c * dims.s));
    for ((x, g), a) in rows {
        let lanes = x
            .chunks_exact(dims.s)
            .zip(g.chunks_exact(dims.s))
            .zip(a.chunks_exact(dims.s));
        for (channel, ((x, g), a)) in lanes.enumerate() {
            let (mean, r) = (saved.mean[channel], saved.inv_std[channel]);
            let sum = &mut sums[channel];
            for ((&x, &g), &a) in x.iter().zip(g).zip(a) {
                let (x_hat, g, a) = ((x.as_f64() - mean) * r, g.as_f64(), a.as_f64());
                sum[0] += g;
                sum[1] += g * x_hat;
                sum[2] += a;
                sum[3] += a * x_hat;
                sum[4] += a * g;
            }
        }
    }
    sums
}

/// `p·A + q·g + s·x̂ + t` with each channel's coefficients, evaluated in `f64` and rounded once.
fn linear_output<T: Element>(inputs: &Inputs<'_, T>, saved: Saved<'_>, coefficients: &[Linear]) -> Vec<T> {
    let Inputs { x, g, a, dims } = inputs;
    collect_blocks(dims_rows(*dims), |range, out| {
        let width = dims.c * dims.s;
        let rows = out
            .chunks_exact_mut(width)
            .zip(x[range.clone()].chunks_exact(width))
            .zip(g[range.clone()].chunks_exact(width))
            .zip(a[range].chunks_exact(width));
        for (((out, x), g), a) in rows {
            let lanes = out
                .chunks_exact_mut(dims.s)
                .zip(x.chunks_exact(dims.s))
                .zip(g.chunks_exact(dims.s))
                .zip(a.chunks_exact(dims.s));
            for (channel, (((out, x), g), a)) in lanes.enumerate() {
                let Linear { p, q, s, t } = coefficients[channel];
                let (mean, r) = (saved.mean[channel], saved.inv_std[channel]);
                for (((out, &x), &g), &a) in out.iter_mut().zip(x).zip(g).zip(a) {
                    let x_hat = (x.as_f64() - mean) * r;
                    out.write(T::from_f64_lossy(p * a.as_f64() + q * g.as_f64() + s * x_hat + t));
                }
            }
        }
    })
}

//! The LayerNorm / GroupNorm backward as ONE fused node, so that it can be differentiated again
//! (see the [module docs](super#the-double-backward)). Its inputs are `x`, the weight (when the
//! normalization has one) and the upstream gradient `g`; its result `dx`, then `dweight` and
//! `dbias` where the normalization has them, concatenated flat and handed out by [`Var::split`].

use std::ops::Range;

use ndarray::{ArrayD, ArrayViewD, IxDyn};
use tape::{BackwardArgs, Element, Function, GraphArgs, TapeError, Var};

use super::kernel::{self, Groups, Saved};
use crate::batch_norm::{row_major, to_f64};
use crate::schedule::{Rows, collect_blocks, fold_blocks, on_pool};

/// The recorded backward of a [`GroupNormNode`](super::GroupNormNode).
#[derive(Debug, Clone)]
pub(crate) struct GroupNormBackward {
    /// `"layer_norm_backward"` or `"group_norm_backward"`.
    pub name: &'static str,
    pub groups: Groups,
    pub has_weight: bool,
    pub has_bias: bool,
    pub mean: Vec<f64>,
    pub inv_std: Vec<f64>,
}

impl GroupNormBackward {
    /// Records this node on `x`'s tape (inputs `x`, the weight if any, `g`) and hands out the
    /// gradients of `x`, the weight and the bias where `needs` asks for them.
    pub fn record<'t, T: Element>(
        self,
        args: &GraphArgs<'_, 't, T>,
    ) -> tape::Result<Vec<Option<Var<'t, T>>>> {
        let x = args.inputs[0];
        let mut inputs = vec![x];
        // The parameters' shapes, in input order: the weight's, then the bias's.
        let parts: Vec<Vec<usize>> = args.inputs.iter().map(|v| v.shape()).collect();
        if self.has_weight {
            inputs.push(args.inputs[1]);
        }
        inputs.push(args.grad_output);
        let flat = x.tape().apply(self, &inputs)?;
        Ok(flat
            .split(&parts)?
            .into_iter()
            .zip(args.needs_grad)
            .map(|(part, &needed)| needed.then_some(part))
            .collect())
    }

    fn len(&self) -> usize {
        self.groups.count * self.groups.len()
    }
}

impl<T: Element> Function<T> for GroupNormBackward {
    fn name(&self) -> &str {
        self.name
    }

    /// The first-order backward, `[dx, dweight, dbias]` (those the node has).
    fn forward(&mut self, inputs: &[ArrayViewD<'_, T>]) -> tape::Result<ArrayD<T>> {
        let expected = 2 + usize::from(self.has_weight);
        let parameters = self.groups.parameters();
        let fits = inputs.len() == expected
            && inputs[0].len() == self.len()
            && inputs[expected - 1].shape() == inputs[0].shape()
            && (!self.has_weight || inputs[1].len() == parameters);
        if !fits {
            let shapes: Vec<&[usize]> = inputs.iter().map(|a| a.shape()).collect();
            return Err(TapeError::op(
                self.name,
                format!("takes x, the weight if any, and dout of x's shape; got shapes {shapes:?}"),
            ));
        }
        let weight = self.has_weight.then(|| to_f64(&inputs[1]));
        let saved = Saved {
            weight: weight.as_deref(),
            mean: &self.mean,
            inv_std: &self.inv_std,
        };
        let (x, g) = (row_major(&inputs[0]), row_major(&inputs[expected - 1]));
        let grads = kernel::backward(&g, &x, self.groups, saved, true);
        let mut flat = grads.dx.unwrap_or_default();
        let as_t = |values: &[f64]| values.iter().map(|&v| T::from_f64_lossy(v)).collect::<Vec<T>>();
        if self.has_weight {
            flat.extend(as_t(&grads.dweight));
        }
        if self.has_bias {
            flat.extend(as_t(&grads.dbias));
        }
        let len = flat.len();
        Ok(ArrayD::from_shape_vec(IxDyn(&[len]), flat).unwrap_or_else(|_| unreachable!("flat")))
    }

    fn backward(&self, args: &BackwardArgs<'_, T>) -> tape::Result<Vec<Option<ArrayD<T>>>> {
        let (x, g) = (&args.inputs[0], &args.inputs[args.inputs.len() - 1]);
        let upstream = row_major(&args.grad_output);
        let parameters = self.groups.parameters();
        let (a, mut rest) = upstream.split_at(x.len());
        let mut take = |present: bool| {
            present.then(|| {
                let (part, tail) = rest.split_at(parameters);
                rest = tail;
                part.iter().map(|v| v.as_f64()).collect::<Vec<f64>>()
            })
        };
        let (b, c) = (take(self.has_weight), take(self.has_bias));
        let weight = if self.has_weight {
            to_f64(&args.inputs[1])
        } else {
            vec![1.0; parameters]
        };
        let (x_values, g_values) = (row_major(x), row_major(g));
        let inputs = Inputs {
            x: &x_values,
            g: &g_values,
            a,
            groups: self.groups,
            weight: &weight,
            b: b.as_deref(),
            c: c.as_deref(),
            mean: &self.mean,
            inv_std: &self.inv_std,
        };
        let needs = args.needs_grad;
        let rows = Rows::new(self.groups.count, self.groups.len());
        let (d_x, d_weight, d_g) = on_pool(rows.parallel(), || {
            let coefficients = coefficients(&inputs);
            let d_x = needs[0].then(|| output(&inputs, &coefficients, Output::X));
            let d_weight = (self.has_weight && needs[1]).then(|| weight_grad(&inputs, &coefficients));
            let d_g = needs[needs.len() - 1].then(|| output(&inputs, &coefficients, Output::G));
            (d_x, d_weight, d_g)
        });
        let shaped = |values: Vec<T>, like: &ArrayViewD<'_, T>| {
            ArrayD::from_shape_vec(like.raw_dim(), values).unwrap_or_else(|_| unreachable!("counts match"))
        };
        let mut grads = vec![d_x.map(|v| shaped(v, x))];
        if self.has_weight {
            let as_t = |v: Vec<f64>| v.into_iter().map(T::from_f64_lossy).collect();
            grads.push(d_weight.map(|v| shaped(as_t(v), &args.inputs[1])));
        }
        grads.push(d_g.map(|v| shaped(v, g)));
        Ok(grads)
    }

    fn saved_bytes(&self) -> usize {
        (self.mean.len() + self.inv_std.len()) * std::mem::size_of::<f64>()
    }
}

/// The arrays of the double backward, row-major: `x`, the first upstream gradient `g`, and `A`,
/// `B`, `C`, the upstream gradients of `dx`, `dweight` and `dbias` (per parameter, in `f64`).
struct Inputs<'a, T> {
    x: &'a [T],
    g: &'a [T],
    a: &'a [T],
    groups: Groups,
    /// The weight, 1 where the normalization has none.
    weight: &'a [f64],
    b: Option<&'a [f64]>,
    c: Option<&'a [f64]>,
    mean: &'a [f64],
    inv_std: &'a [f64],
}

/// One group's means (over its `M` values, `ĝ = w g` and `h = B g`): `Ā`, `mean(A x̂)`,
/// `mean(A ĝ)`, `mean(ĝ)`, `mean(ĝ x̂)`, `mean(h)`, `mean(h x̂)`.
type Means = [f64; 7];

/// Calls `each(lane, values)` for each lane of group `g`, `values` its range in the data.
fn lanes(groups: Groups, g: usize, mut each: impl FnMut(usize, Range<usize>)) {
    let (len, s) = (groups.len(), groups.s);
    for lane in 0..groups.lanes {
        let start = g * len + lane * s;
        each(groups.set(g).start + lane, start..start + s);
    }
}

fn coefficients<T: Element>(inputs: &Inputs<'_, T>) -> Vec<Means> {
    let groups = inputs.groups;
    let m = groups.len() as f64;
    let rows = Rows::new(groups.count, groups.len());
    let means = |range: Range<usize>| -> Vec<Means> {
        let first = range.start / groups.len().max(1);
        let count = range.len() / groups.len().max(1);
        (first..first + count)
            .map(|g| {
                let (mu, r) = (inputs.mean[g], inputs.inv_std[g]);
                let mut sums = [0.0; 7];
                lanes(groups, g, |p, values| {
                    let (w, b) = (inputs.weight[p], inputs.b.map_or(0.0, |b| b[p]));
                    for i in values {
                        let (x_hat, g, a) = (
                            (inputs.x[i].as_f64() - mu) * r,
                            inputs.g[i].as_f64(),
                            inputs.a[i].as_f64(),
                        );
                        let (wg, h) = (w * g, b * g);
                        let terms = [a, a * x_hat, a * wg, wg, wg * x_hat, h, h * x_hat];
                        for (s, t) in sums.iter_mut().zip(terms) {
                            *s += t;
                        }
                    }
                });
                sums.map(|s| s / m)
            })
            .collect()
    };
    fold_blocks(rows, means, |all, block| all.extend(block)).unwrap_or_default()
}

#[derive(Clone, Copy, PartialEq)]
enum Output {
    X,
    G,
}

/// `∂S/∂x` or `∂S/∂g`, element by element from the group's means (module docs).
fn output<T: Element>(inputs: &Inputs<'_, T>, means: &[Means], which: Output) -> Vec<T> {
    let groups = inputs.groups;
    let len = groups.len();
    collect_blocks(Rows::new(groups.count, len), |range, out| {
        let first = range.start / len;
        for (i, out) in out.chunks_exact_mut(len).enumerate() {
            let g = first + i;
            let [a_mean, ax, _, wg_mean, m, h_mean, hx] = means[g];
            let (mu, r) = (inputs.mean[g], inputs.inv_std[g]);
            let covariance = means[g][2] - a_mean * wg_mean;
            let start = g * len;
            lanes(groups, g, |p, values| {
                let (w, b) = (inputs.weight[p], inputs.b.map_or(0.0, |b| b[p]));
                let c = inputs.c.map_or(0.0, |c| c[p]);
                for k in values {
                    let x_hat = (inputs.x[k].as_f64() - mu) * r;
                    let (gk, ak) = (inputs.g[k].as_f64(), inputs.a[k].as_f64());
                    let value = match which {
                        Output::X => {
                            let rr = r * r;
                            -rr * m * ak
                                + (-rr * ax * w + r * b) * gk
                                + x_hat * (rr * (3.0 * ax * m - covariance) - r * hx)
                                + rr * (m * a_mean + ax * wg_mean)
                                - r * h_mean
                        }
                        Output::G => w * r * (ak - a_mean - x_hat * ax) + b * x_hat + c,
                    };
                    out[k - start].write(T::from_f64_lossy(value));
                }
            });
        }
    })
}

/// `∂S/∂w_p = Σ g r (A - Ā - x̂ mean(A x̂))` over the values of parameter `p` in every group.
fn weight_grad<T: Element>(inputs: &Inputs<'_, T>, means: &[Means]) -> Vec<f64> {
    let groups = inputs.groups;
    let len = groups.len();
    let block = |range: Range<usize>| {
        let mut sums = vec![0.0; groups.parameters()];
        let first = range.start / len.max(1);
        let count = range.len() / len.max(1);
        for (g, means) in means.iter().enumerate().skip(first).take(count) {
            let (a_mean, ax) = (means[0], means[1]);
            let (mu, r) = (inputs.mean[g], inputs.inv_std[g]);
            lanes(groups, g, |p, values| {
                for k in values {
                    let x_hat = (inputs.x[k].as_f64() - mu) * r;
                    sums[p] += inputs.g[k].as_f64() * r * (inputs.a[k].as_f64() - a_mean - x_hat * ax);
                }
            });
        }
        sums
    };
    let merge = |total: &mut Vec<f64>, next: Vec<f64>| total.iter_mut().zip(next).for_each(|(t, v)| *t += v);
    fold_blocks(Rows::new(groups.count, len), block, merge).unwrap_or_else(|| vec![0.0; groups.parameters()])
}

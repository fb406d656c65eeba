//! The array math of LayerNorm and GroupNorm on contiguous groups: the data is `count` groups of
//! `lanes × s` values each, one after the other, and lane `p` of a group has parameter `p` of
//! the group's parameter set.
//!
//! Reused from BatchNorm's kernel, where the math is the same: each group's statistics are
//! [`channel_stats`] of a one-row view in which every group is a "channel" (two passes over
//! contiguous values, in `f64`, with its rescue of extreme data), and the work is split by
//! [`crate::schedule`] into blocks of whole groups fixed by the shape, partial parameter
//! gradients merged in block order. So the results are bit-identical on any number of threads.
//!
//! The output and `dx` are evaluated in `f64` and rounded once to `T`.

use std::mem::MaybeUninit;
use std::ops::Range;

use multiversion::multiversion;
use tape::Element;

use crate::batch_norm::kernel::{Dims, channel_stats};
use crate::schedule::{Rows, collect_blocks_with, fold_blocks, on_pool};

/// How the data splits into groups and the groups into lanes of one parameter each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Groups {
    /// Groups in all.
    pub count: usize,
    /// Lanes per group: the parameters a group uses.
    pub lanes: usize,
    /// Values per lane.
    pub s: usize,
    /// How many parameter sets there are (at least 1): group `g` uses set `g % sets`.
    pub sets: usize,
}

impl Groups {
    /// Values per group.
    pub fn len(&self) -> usize {
        self.lanes * self.s
    }

    /// Parameters in all: `sets × lanes`.
    pub fn parameters(&self) -> usize {
        self.sets * self.lanes
    }

    /// The parameters of group `g`.
    pub fn set(&self, g: usize) -> Range<usize> {
        let start = g % self.sets.max(1) * self.lanes;
        start..start + self.lanes
    }

    /// The scheduler's view: one row per group.
    fn rows(&self) -> Rows {
        Rows::new(self.count, self.len())
    }

    /// BatchNorm's view, in which group `g` is channel `g` of a single row.
    fn as_channels(&self) -> Dims {
        Dims {
            n: 1,
            c: self.count,
            s: self.len(),
        }
    }
}

/// Per-lane scale and shift: `weight` (1 where `None`) and `bias` (0 where `None`), `f64`, of
/// [`Groups::parameters`] values each.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Affine<'a> {
    pub weight: Option<&'a [f64]>,
    pub bias: Option<&'a [f64]>,
}

/// Each group's mean and `inv_std = 1 / sqrt(var + eps)` (0 where `var + eps == 0`, as
/// BatchNorm's), and the output `(x - mean) · inv_std · weight + bias`.
pub(crate) fn forward<T: Element>(
    x: &[T],
    groups: Groups,
    affine: Affine<'_>,
    eps: f64,
) -> (Vec<f64>, Vec<f64>, Vec<T>) {
    let (rows, len) = (groups.rows(), groups.len());
    let (ones, zeros) = (vec![1.0; groups.parameters()], vec![0.0; groups.parameters()]);
    let (weight, bias) = (affine.weight.unwrap_or(&ones), affine.bias.unwrap_or(&zeros));
    let (out, blocks) = on_pool(rows.parallel(), || {
        collect_blocks_with(rows, |range, out| {
            let first = range.start / len;
            let per_group = out.chunks_exact_mut(len).enumerate().map(|(i, out)| {
                let g = first + i;
                let stats = channel_stats(x, groups.as_channels(), g);
                let inv_std = stats.inv_std(eps);
                let set = groups.set(g);
                let affine = (&weight[set.clone()], &bias[set]);
                normalize_group(&x[g * len..][..len], out, groups.s, affine, (stats.mean, inv_std));
                (stats.mean, inv_std)
            });
            per_group.collect::<Vec<_>>()
        })
    });
    let (mean, inv_std) = blocks.into_iter().flatten().unzip();
    (mean, inv_std, out)
}

/// One output value: `(x - mean) · scale + shift` in f64, rounded once. `x == mean` gives
/// exactly `shift`.
#[inline(always)]
fn affine_value<T: Element>(v: T, mean: f64, scale: f64, shift: f64) -> MaybeUninit<T> {
    MaybeUninit::new(T::from_f64_lossy((v.as_f64() - mean) * scale + shift))
}

/// One group's output, lane by lane: scale `inv_std · weight[p]`, shift `bias[p]`.
#[multiversion(targets("x86_64+avx2+fma"))]
fn normalize_group<T: Element>(
    x: &[T],
    out: &mut [MaybeUninit<T>],
    s: usize,
    (weight, bias): (&[f64], &[f64]),
    (mean, inv_std): (f64, f64),
) {
    if s == 1 {
        // One value per lane (LayerNorm): a flat loop over the values, which vectorises.
        let lanes = weight.len();
        let (x, out, bias) = (&x[..lanes], &mut out[..lanes], &bias[..lanes]);
        for p in 0..lanes {
            out[p] = affine_value(x[p], mean, inv_std * weight[p], bias[p]);
        }
        return;
    }
    let lanes = out.chunks_exact_mut(s).zip(x.chunks_exact(s));
    for ((out, x), (&w, &b)) in lanes.zip(weight.iter().zip(bias)) {
        let scale = inv_std * w;
        for (o, &v) in out.iter_mut().zip(x) {
            *o = affine_value(v, mean, scale, b);
        }
    }
}

/// What [`backward`] needs besides `dout` and `x`: the weight (1 where `None`), and each group's
/// mean and `inv_std` from the forward.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Saved<'a> {
    pub weight: Option<&'a [f64]>,
    pub mean: &'a [f64],
    pub inv_std: &'a [f64],
}

/// What [`backward`] returns: `dx` (when asked for), and per parameter `dweight = Σ dout · x̂` and
/// `dbias = Σ dout` over every group using it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Grads<T> {
    pub dx: Option<Vec<T>>,
    pub dweight: Vec<f64>,
    pub dbias: Vec<f64>,
}

/// Per-parameter sums of a block of groups.
#[derive(Debug, Clone)]
struct ParameterSums {
    dweight: Vec<f64>,
    dbias: Vec<f64>,
}

impl ParameterSums {
    fn new(parameters: usize) -> Self {
        ParameterSums {
            dweight: vec![0.0; parameters],
            dbias: vec![0.0; parameters],
        }
    }

    /// Adds `other`'s sums to these.
    fn merge(&mut self, other: ParameterSums) {
        for (a, b) in self.dweight.iter_mut().zip(other.dweight) {
            *a += b;
        }
        for (a, b) in self.dbias.iter_mut().zip(other.dbias) {
            *a += b;
        }
    }
}

/// The gradients given the upstream gradient `dout` (derived in the [module docs](super)): per
/// group, one pass for the lane sums `Σ dout` and `Σ dout · x̂` (which give both the parameter
/// gradients and the group's two coefficients of `dx`), and one writing `dx` (skipped unless
/// `want_dx`), the group's values then in cache.
pub(crate) fn backward<T: Element>(
    dout: &[T],
    x: &[T],
    groups: Groups,
    saved: Saved<'_>,
    want_dx: bool,
) -> Grads<T> {
    let (rows, len) = (groups.rows(), groups.len());
    let ones = vec![
        1.0;
        if saved.weight.is_some() {
            0
        } else {
            groups.parameters()
        }
    ];
    let weight = saved.weight.unwrap_or(&ones);
    // One block's work: each of its groups, with `out` its part of `dx` when wanted.
    let block = |range: Range<usize>, mut out: Option<&mut [MaybeUninit<T>]>| {
        let mut sums = ParameterSums::new(groups.parameters());
        let first = range.start / len;
        for i in 0..range.len() / len {
            let (g, values) = (first + i, (range.start + i * len)..(range.start + (i + 1) * len));
            let set = groups.set(g);
            let dx = out.as_deref_mut().map(|out| &mut out[i * len..][..len]);
            group_backward(
                (&dout[values.clone()], &x[values]),
                groups.s,
                (&weight[set.clone()], saved.mean[g], saved.inv_std[g]),
                (&mut sums.dweight[set.clone()], &mut sums.dbias[set]),
                dx,
            );
        }
        sums
    };
    on_pool(rows.parallel(), || {
        let (dx, sums) = if want_dx {
            let (dx, blocks) = collect_blocks_with(rows, |range, out| block(range, Some(out)));
            let sums = blocks.into_iter().reduce(|mut total, next| {
                total.merge(next);
                total
            });
            (Some(dx), sums)
        } else {
            (
                None,
                fold_blocks(rows, |range| block(range, None), ParameterSums::merge),
            )
        };
        let sums = sums.unwrap_or_else(|| ParameterSums::new(groups.parameters()));
        Grads {
            dx,
            dweight: sums.dweight,
            dbias: sums.dbias,
        }
    })
}

/// One group's backward. Adds its lanes' `Σ dout · x̂` and `Σ dout` to `dweight` and `dbias`;
/// with `dx`, writes `inv_std · (w · dout - mean(w · dout) - x̂ · mean(w · dout · x̂))`, in f64.
#[multiversion(targets("x86_64+avx2+fma"))]
fn group_backward<T: Element>(
    (dout, x): (&[T], &[T]),
    s: usize,
    (weight, mean, inv_std): (&[f64], f64, f64),
    (dweight, dbias): (&mut [f64], &mut [f64]),
    dx: Option<&mut [MaybeUninit<T>]>,
) {
    let xhat = |v: T| (v.as_f64() - mean) * inv_std;
    let lanes = weight.len();
    // Σ w · dout and Σ w · dout · x̂ over the group.
    let (mut sum_g, mut sum_gx) = (0.0, 0.0);
    if s == 1 {
        // One value per lane (LayerNorm): the parameter sums in a flat loop, then the group's
        // two sums as reductions over the values (now in L1), each loop in the shape that
        // vectorises.
        let (dout, x, weight) = (&dout[..lanes], &x[..lanes], &weight[..lanes]);
        let (dweight, dbias) = (&mut dweight[..lanes], &mut dbias[..lanes]);
        for p in 0..lanes {
            let g = dout[p].as_f64();
            dweight[p] += g * xhat(x[p]);
            dbias[p] += g;
        }
        let (mut acc_g, mut acc_gx) = ([0.0; LANES], [0.0; LANES]);
        let blocks = dout
            .chunks_exact(LANES)
            .zip(x.chunks_exact(LANES))
            .zip(weight.chunks_exact(LANES));
        for ((g, v), w) in blocks {
            for ((((ag, agx), &g), &v), &w) in acc_g.iter_mut().zip(&mut acc_gx).zip(g).zip(v).zip(w) {
                let wg = w * g.as_f64();
                *ag += wg;
                *agx += wg * (v.as_f64() - mean);
            }
        }
        let full = lanes / LANES * LANES;
        for (p, (ag, agx)) in (full..lanes).zip(acc_g.iter_mut().zip(&mut acc_gx)) {
            let wg = weight[p] * dout[p].as_f64();
            *ag += wg;
            *agx += wg * (x[p].as_f64() - mean);
        }
        sum_g = acc_g.iter().sum();
        sum_gx = acc_gx.iter().sum::<f64>() * inv_std;
    } else {
        for (p, (g, v)) in dout.chunks_exact(s).zip(x.chunks_exact(s)).enumerate() {
            let (lane_g, lane_gx) = lane_sums(g, v, mean, inv_std);
            dweight[p] += lane_gx;
            dbias[p] += lane_g;
            sum_g += weight[p] * lane_g;
            sum_gx += weight[p] * lane_gx;
        }
    }
    let Some(dx) = dx else { return };
    let count = (lanes * s) as f64;
    let (mean_g, mean_gx) = (sum_g / count, sum_gx / count);
    let value = |g: T, v: T, w: f64| {
        MaybeUninit::new(T::from_f64_lossy(
            inv_std * (w * g.as_f64() - mean_g - xhat(v) * mean_gx),
        ))
    };
    if s == 1 {
        let (dout, x, dx) = (&dout[..lanes], &x[..lanes], &mut dx[..lanes]);
        for p in 0..lanes {
            dx[p] = value(dout[p], x[p], weight[p]);
        }
        return;
    }
    let lanes = dx
        .chunks_exact_mut(s)
        .zip(dout.chunks_exact(s).zip(x.chunks_exact(s)));
    for ((dx, (g, v)), &w) in lanes.zip(weight) {
        for ((o, &g), &v) in dx.iter_mut().zip(g).zip(v) {
            *o = value(g, v, w);
        }
    }
}

/// Independent partial sums per loop: enough for the compiler to keep them in SIMD registers.
const LANES: usize = 8;

/// `Σ dout` and `Σ dout · x̂` over one lane, in [`LANES`] interleaved partial sums each.
#[inline(always)]
fn lane_sums<T: Element>(dout: &[T], x: &[T], mean: f64, inv_std: f64) -> (f64, f64) {
    let (mut acc_g, mut acc_gx) = ([0.0; LANES], [0.0; LANES]);
    for (g, v) in dout.chunks_exact(LANES).zip(x.chunks_exact(LANES)) {
        for (((ag, agx), &g), &v) in acc_g.iter_mut().zip(&mut acc_gx).zip(g).zip(v) {
            let g = g.as_f64();
            *ag += g;
            *agx += g * (v.as_f64() - mean);
        }
    }
    let full = dout.len() / LANES * LANES;
    let rest = dout[full..].iter().zip(&x[full..]);
    for (((ag, agx), &g), &v) in acc_g
        .iter_mut()
        .zip(&mut acc_gx)
        .zip(rest.clone().map(|(g, _)| g))
        .zip(rest.map(|(_, v)| v))
    {
        let g = g.as_f64();
        *ag += g;
        *agx += g * (v.as_f64() - mean);
    }
    (acc_g.iter().sum(), acc_gx.iter().sum::<f64>() * inv_std)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch_norm::testing::{normal, on_1_2_3_threads};

    fn layer(rows: usize, width: usize) -> Groups {
        Groups {
            count: rows,
            lanes: width,
            s: 1,
            sets: 1,
        }
    }

    #[test]
    fn groups_take_their_own_parameter_sets() {
        // GroupNorm of (N = 2, C = 6, S = 3) with 3 groups: 6 groups of 2 lanes, 3 sets.
        let groups = Groups {
            count: 6,
            lanes: 2,
            s: 3,
            sets: 3,
        };
        assert_eq!(groups.len(), 6);
        assert_eq!(groups.parameters(), 6);
        assert_eq!(groups.set(4), 2..4);
        assert_eq!(groups.set(5), 4..6);
    }

    #[test]
    fn a_constant_group_gives_exactly_its_bias() {
        let x = [1e30f32, 1e30, 1e30, 2.5, 2.5, 2.5];
        let (w, b) = ([3.0, -2.0, 0.5], [0.25, -0.75, 1.5]);
        let affine = Affine {
            weight: Some(&w),
            bias: Some(&b),
        };
        let (_, _, out) = forward(&x, layer(2, 3), affine, 1e-5);
        assert_eq!(out, vec![0.25, -0.75, 1.5, 0.25, -0.75, 1.5]);
        // eps = 0: inv_std is 0 by convention, never NaN.
        let (_, inv_std, out) = forward(&x, layer(2, 3), affine, 0.0);
        assert_eq!(inv_std, vec![0.0, 0.0]);
        assert_eq!(out, vec![0.25, -0.75, 1.5, 0.25, -0.75, 1.5]);
    }

    #[test]
    fn statistics_are_taken_in_f64_for_f32_data() {
        // 1e4 + small deviations: an f32 running sum would lose the deviations' digits.
        let x: Vec<f32> = (0..4096).map(|i| 1e4 + (i % 7) as f32 * 1e-3).collect();
        let (mean, inv_std, _) = forward(&x, layer(1, 4096), Affine::default(), 0.0);
        let exact: f64 = x.iter().map(|&v| f64::from(v)).sum::<f64>() / 4096.0;
        let var: f64 = x.iter().map(|&v| (f64::from(v) - exact).powi(2)).sum::<f64>() / 4096.0;
        assert!((mean[0] - exact).abs() <= 1e-12 * exact);
        assert!((inv_std[0] - 1.0 / var.sqrt()).abs() <= 1e-9 * inv_std[0]);
    }

    #[test]
    fn results_are_bit_identical_on_any_thread_count() {
        for groups in [
            layer(4096, 96),
            Groups {
                count: 512,
                lanes: 2,
                s: 300,
                sets: 16,
            },
        ] {
            let len = groups.count * groups.len();
            let x = normal(&[len], 0.5, 2.0, 1).into_raw_vec_and_offset().0;
            let dout = normal(&[len], 0.0, 1.0, 2).into_raw_vec_and_offset().0;
            let w: Vec<f64> = (0..groups.parameters()).map(|p| 1.0 + p as f64 * 0.01).collect();
            let affine = Affine {
                weight: Some(&w),
                bias: Some(&w),
            };
            let runs = on_1_2_3_threads(|| {
                let (mean, inv_std, out) = forward(&x, groups, affine, 1e-5);
                let saved = Saved {
                    weight: Some(&w),
                    mean: &mean,
                    inv_std: &inv_std,
                };
                (out, backward(&dout, &x, groups, saved, true))
            });
            assert!(groups.rows().parallel());
            assert_eq!(runs[0], runs[1]);
            assert_eq!(runs[0], runs[2]);
            // The parameter sums without dx are the same sums.
            let (mean, inv_std, _) = forward(&x, groups, affine, 1e-5);
            let saved = Saved {
                weight: Some(&w),
                mean: &mean,
                inv_std: &inv_std,
            };
            let without = backward(&dout, &x, groups, saved, false);
            assert_eq!(without.dx, None);
            assert_eq!(
                (without.dweight, without.dbias),
                (runs[0].1.dweight.clone(), runs[0].1.dbias.clone())
            );
        }
    }

    #[test]
    fn no_groups_give_empty_results_and_zero_parameter_gradients() {
        let groups = layer(0, 4);
        let (mean, _, out) = forward::<f64>(&[], groups, Affine::default(), 1e-5);
        assert!(mean.is_empty() && out.is_empty());
        let saved = Saved {
            weight: None,
            mean: &[],
            inv_std: &[],
        };
        let grads = backward::<f64>(&[], &[], groups, saved, true);
        assert_eq!(grads.dx, Some(vec![]));
        assert_eq!(grads.dweight, vec![0.0; 4]);
    }
}

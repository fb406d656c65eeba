//! The convolution's backward as ONE fused node, `conv2d_backward`, so that it can be
//! differentiated again (see the [module docs](super#the-double-backward)). Its inputs are `x`,
//! `W` and `G_Y`; its result `∂L/∂x`, `∂L/∂W` (and `∂L/∂b` for a convolution with bias),
//! concatenated flat and handed out by [`Var::split`].

use ndarray::{ArrayD, ArrayViewD, IxDyn};
use tape::{BackwardArgs, Element, Function, GraphArgs, TapeError, Var};

use super::node::Conv2dNode;
use crate::batch_norm::row_major;

/// The recorded backward of a [`Conv2dNode`]: inputs `x`, `weight`, `dout`.
#[derive(Clone, Copy)]
pub(crate) struct Conv2dBackward {
    pub conv: Conv2dNode,
    /// Whether the convolution has a bias (whose gradient is then part of the result).
    pub bias: bool,
}

impl Conv2dBackward {
    /// The shapes of the parts of the result: those of `x`, `weight` and (with a bias) `bias`.
    fn parts(&self) -> Vec<Vec<usize>> {
        let g = self.conv.geometry();
        let mut parts = vec![g.input_shape().to_vec(), g.weight_shape().to_vec()];
        if self.bias {
            parts.push(vec![g.c_out]);
        }
        parts
    }

    /// Records this node on `dout`'s tape and hands out its parts where `needs` asks for them.
    pub fn record<'t, T: Element>(
        self,
        (x, weight, dout): (Var<'t, T>, Var<'t, T>, Var<'t, T>),
        needs: &[bool],
    ) -> tape::Result<Vec<Option<Var<'t, T>>>> {
        let parts = self.parts();
        let flat = dout.tape().apply(self, &[x, weight, dout])?;
        Ok(flat
            .split(&parts)?
            .into_iter()
            .zip(needs)
            .map(|(part, &needed)| needed.then_some(part))
            .collect())
    }

    fn check<T>(&self, inputs: &[ArrayViewD<'_, T>]) -> tape::Result<()> {
        let g = self.conv.geometry();
        let expected = [g.input_shape(), g.weight_shape(), g.output_shape()];
        let fits = inputs.len() == 3 && inputs.iter().zip(&expected).all(|(a, e)| a.shape() == e);
        if fits {
            return Ok(());
        }
        let got: Vec<&[usize]> = inputs.iter().map(|a| a.shape()).collect();
        Err(TapeError::op(
            "conv2d_backward",
            format!("takes x, weight and dout of shapes {expected:?}, got {got:?}"),
        ))
    }
}

fn flat<T>(values: Vec<T>, shape: &[usize]) -> ArrayD<T> {
    ArrayD::from_shape_vec(IxDyn(shape), values).unwrap_or_else(|_| unreachable!("one value per element"))
}

impl<T: Element> Function<T> for Conv2dBackward {
    fn name(&self) -> &str {
        "conv2d_backward"
    }

    /// The convolution's backward, `[dx, dweight, dbias]`.
    fn forward(&mut self, inputs: &[ArrayViewD<'_, T>]) -> tape::Result<ArrayD<T>> {
        self.check(inputs)?;
        let (x, weight, dout) = (
            row_major(&inputs[0]),
            row_major(&inputs[1]),
            row_major(&inputs[2]),
        );
        let (dx, sums) = self
            .conv
            .backward_values(&x, &weight, &dout, [true, true, self.bias]);
        let mut all = dx.unwrap_or_default();
        all.extend(sums.dweight);
        all.extend(sums.dbias.iter().map(|&v| T::from_f64_lossy(v)));
        let len = all.len();
        Ok(flat(all, &[len]))
    }

    /// With upstream `A`, `B`, `c` (of `dx`, `dweight`, `dbias`): `∂/∂x = dx(dout, B)`,
    /// `∂/∂W = dweight(A, dout)`, `∂/∂dout = conv(A, W) + c + conv(x, B)`.
    fn backward(&self, args: &BackwardArgs<'_, T>) -> tape::Result<Vec<Option<ArrayD<T>>>> {
        let g = self.conv.geometry();
        let upstream = row_major(&args.grad_output);
        let (a, rest) = upstream.split_at(g.input_len());
        let (b, c) = rest.split_at(g.weight_len());
        let (x, weight, dout) = (
            row_major(&args.inputs[0]),
            row_major(&args.inputs[1]),
            row_major(&args.inputs[2]),
        );
        let conv = &self.conv;
        let d_x = args.needs_grad[0].then(|| {
            let (dx, _) = conv.backward_values(&x, b, &dout, [true, false, false]);
            flat(dx.unwrap_or_default(), &g.input_shape())
        });
        let d_weight = args.needs_grad[1].then(|| {
            let (_, sums) = conv.backward_values(a, &weight, &dout, [false, true, false]);
            flat(sums.dweight, &g.weight_shape())
        });
        let d_dout = args.needs_grad[2].then(|| {
            let bias = self.bias.then_some(c);
            let mut sum = conv.forward_values(a, &weight, bias);
            for (s, v) in sum.iter_mut().zip(conv.forward_values(&x, b, None)) {
                *s = *s + v;
            }
            flat(sum, &g.output_shape())
        });
        Ok(vec![d_x, d_weight, d_dout])
    }

    /// The same three maps recorded with convolution nodes: `conv2d` for `∂/∂dout`, and this
    /// node's own parts for the other two, so the convolution differentiates to any order.
    fn backward_graph<'t>(&self, args: &GraphArgs<'_, 't, T>) -> tape::Result<Vec<Option<Var<'t, T>>>> {
        let [x, weight, dout] = args.inputs else {
            return Err(TapeError::op(
                "conv2d_backward",
                "backward takes the 3 forward inputs",
            ));
        };
        let tape = dout.tape();
        let upstream = args.grad_output.split(&self.parts())?;
        let (a, b) = (upstream[0], upstream[1]);
        let without_bias = Conv2dBackward { bias: false, ..*self };
        let d_x = match args.needs_grad[0] {
            true => without_bias.record((*x, b, *dout), &[true, false])?[0],
            false => None,
        };
        let d_weight = match args.needs_grad[1] {
            true => without_bias.record((a, *weight, *dout), &[false, true])?[1],
            false => None,
        };
        let d_dout = match args.needs_grad[2] {
            true => {
                let with_c = match self.bias {
                    true => tape.apply(self.conv, &[a, *weight, upstream[2]])?,
                    false => tape.apply(self.conv, &[a, *weight])?,
                };
                Some(with_c.try_add(tape.apply(self.conv, &[*x, b])?)?)
            }
            false => None,
        };
        Ok(vec![d_x, d_weight, d_dout])
    }
}

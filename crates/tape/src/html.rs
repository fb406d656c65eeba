//! Backprop to step through in a browser: [`Tape::to_html`] writes one self-contained HTML page
//! (inline CSS, JavaScript and SVG; nothing fetched) that replays a real backward pass of the
//! tape, node by node, beside the forward pass that built it.
//!
//! The graph is laid out here, in columns by depth (a leaf is at depth 0, an op one column right
//! of its deepest input). Each node shows its op, shape, value and gradient (every value for
//! tensors of up to [`FULL_VALUES`] elements, else the mean, minimum and maximum). The page steps
//! forward through the nodes in creation order, then backward in the order
//! [`Tape::backward_trace`] visited them: at each backward step the node, the rule it applies,
//! the gradient that reached it and what it sends to each input, with the running sum where a
//! value feeds several ops. Buttons and the arrow keys (Home and End to jump) move the step.
//! For each trainable leaf the page lists its gradient beside a finite-difference estimate,
//! computed when the page is written ([`finite_differences`]).

use std::fmt::Write as _;

use ndarray::ArrayD;
use serde_json::{Value, json};

use crate::{Element, Gradients, Result, Tape, TapeError, Var, VarId};

/// Tensors of up to this many elements are shown whole; larger ones as mean, minimum, maximum.
pub const FULL_VALUES: usize = 12;

/// What [`Tape::to_html`] puts on the page besides the tape.
#[derive(Debug, Clone, Default)]
pub struct HtmlOptions {
    /// The page's title and heading.
    pub title: String,
    /// A paragraph under the heading (plain text).
    pub description: String,
    /// Names for some nodes (`x`, `gamma`, ...), shown with their op.
    pub names: Vec<(VarId, String)>,
    /// For trainable leaves: a finite-difference estimate of the loss's gradient, shown beside
    /// the tape's ([`finite_differences`] computes them).
    pub finite_differences: Vec<(VarId, ArrayD<f64>)>,
}

/// The derivative rule of a primitive in one line, for the page (other ops give their own,
/// [`Function::rule`](crate::Function::rule)).
fn rule(op: &str) -> &'static str {
    match op {
        "add" => "add: ∂/∂a = g, ∂/∂b = g (summed over broadcast axes)",
        "sub" => "sub: ∂/∂a = g, ∂/∂b = -g (summed over broadcast axes)",
        "mul" => "mul: ∂/∂a = g·b, ∂/∂b = g·a (summed over broadcast axes)",
        "div" => "div: ∂/∂a = g / b, ∂/∂b = -g·a / b²",
        "neg" => "neg: ∂/∂x = -g",
        "exp" => "exp: ∂/∂x = g·exp(x)",
        "ln" => "ln: ∂/∂x = g / x",
        "sqrt" => "sqrt: ∂/∂x = g / (2 √x)",
        "powi" | "powf" => "pow: ∂/∂x = g·p·x^(p-1)",
        "abs" => "abs: ∂/∂x = g·sign(x)",
        "relu" => "relu: ∂/∂x = g where x > 0, else 0",
        "sigmoid" => "sigmoid: ∂/∂x = g·s(1 - s), s = sigmoid(x)",
        "tanh" => "tanh: ∂/∂x = g·(1 - tanh²x)",
        "add_scalar" => "add_scalar: ∂/∂x = g",
        "mul_scalar" => "mul_scalar: ∂/∂x = g·c",
        "div_scalar" => "div_scalar: ∂/∂x = g / c",
        "scalar_div" => "scalar_div: ∂/∂x = -g·c / x²",
        "sum" => "sum: ∂/∂x = g, spread over every element",
        "mean" => "mean: ∂/∂x = g / M, spread over the M elements averaged",
        "max" => "max: ∂/∂x = g at the arg-max of each lane, 0 elsewhere",
        "reshape" => "reshape: ∂/∂x = g reshaped back",
        "broadcast_to" => "broadcast_to: ∂/∂x = g summed back over the broadcast axes",
        "transpose" | "swap_last_axes" => "transpose: ∂/∂x = gᵀ",
        "matmul" => "matmul: ∂/∂A = g·Bᵀ, ∂/∂B = Aᵀ·g",
        "batch_norm" => {
            "batch_norm (fused): ∂/∂x = γ r [g - mean(g) - x̂ mean(g x̂)], ∂/∂γ = Σ g x̂, ∂/∂β = Σ g"
        }
        "softmax_cross_entropy" => "softmax_cross_entropy (fused): ∂/∂z = (g/N)(softmax(z) - onehot)",
        _ => "",
    }
}

/// A tensor for the page: every value (to 6 significant digits) when small, else a summary.
fn shown<T: Element>(a: &ArrayD<T>) -> Value {
    let values: Vec<f64> = a.iter().map(|v| v.as_f64()).collect();
    if values.len() <= FULL_VALUES {
        return json!({ "values": values.iter().map(|&v| sig6(v)).collect::<Vec<_>>() });
    }
    let mean = values.iter().sum::<f64>() / values.len() as f64;
    let (min, max) = values
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &v| {
            (lo.min(v), hi.max(v))
        });
    json!({ "summary": format!("mean {} · min {} · max {}", sig6(mean), sig6(min), sig6(max)) })
}

/// `v` to 6 significant digits, as the page prints it.
fn sig6(v: f64) -> String {
    if v == 0.0 || !v.is_finite() {
        return format!("{v}");
    }
    let formatted = format!("{v:.5e}");
    // Back to a plain number where that reads better.
    match formatted.parse::<f64>() {
        Ok(x) if (1e-4..1e6).contains(&x.abs()) => {
            let digits = 5 - x.abs().log10().floor() as i32;
            format!("{:.*}", digits.max(0) as usize, x)
        }
        _ => formatted,
    }
}

impl<T: Element> Tape<T> {
    /// The page that steps through the forward and backward passes of this tape for `output`
    /// with upstream gradient `grad_output` (see the [module docs](crate::html)). The backward
    /// pass is run here, traced ([`Tape::backward_trace`]).
    ///
    /// # Errors
    /// As [`Tape::backward_trace`], and [`TapeError::ForeignVar`] for a name or an estimate of
    /// a node of another tape.
    ///
    /// # Example
    /// ```
    /// use ndarray::array;
    /// use tape::html::HtmlOptions;
    ///
    /// let tape = tape::Tape::new();
    /// let x = tape.var(array![1.0, 2.0]);
    /// let y = (x * x).sum();
    /// let options = HtmlOptions { title: "x²".into(), names: vec![(x.id(), "x".into())], ..HtmlOptions::default() };
    /// let page = tape.to_html(y, ndarray::arr0(1.0).into_dyn(), &options)?;
    /// assert!(page.starts_with("<!DOCTYPE html>") && page.contains("\"mul\""));
    /// # Ok::<(), tape::TapeError>(())
    /// ```
    pub fn to_html(
        &self,
        output: Var<'_, T>,
        grad_output: ArrayD<T>,
        options: &HtmlOptions,
    ) -> Result<String> {
        let (grads, steps) = self.backward_trace(output, grad_output)?;
        let vars = self.vars();
        let index_of = |id: VarId| {
            self.get(id)
                .map(|v| v.index())
                .ok_or_else(|| TapeError::ForeignVar { op: "to_html".into() })
        };
        let mut names = vec![String::new(); vars.len()];
        for (id, name) in &options.names {
            names[index_of(*id)?] = name.clone();
        }
        let mut depth = vec![0usize; vars.len()];
        for var in &vars {
            depth[var.index()] = var.inputs().iter().map(|&i| depth[i] + 1).max().unwrap_or(0);
        }
        let last = output.index();
        // How many inputs of the output's graph each node is: more than one, and its gradient
        // is a sum.
        let mut uses = vec![0usize; vars.len()];
        for var in &vars[..=last] {
            var.inputs().iter().for_each(|&i| uses[i] += 1);
        }
        let nodes: Vec<Value> = vars[..=last]
            .iter()
            .map(|var| {
                let own = self.rule_of(var.index());
                let rule = if own.is_empty() {
                    rule(&var.op_name()).to_string()
                } else {
                    own
                };
                node_json(var, &grads, (&names, depth[var.index()]), rule)
            })
            .collect();
        // The running gradient of each node as the backward pass adds contributions to it.
        let mut totals: Vec<Option<ArrayD<T>>> = vec![None; vars.len()];
        totals[last] = steps.first().map(|s| s.grad_output.clone());
        let backward: Vec<Value> = steps
            .iter()
            .map(|step| {
                let contributions: Vec<Value> = step
                    .contributions
                    .iter()
                    .map(|(input, g)| {
                        let total = match totals[*input].take() {
                            Some(t) => t + g,
                            None => g.clone(),
                        };
                        let shared = uses[*input] > 1;
                        let entry = json!({ "to": input, "value": shown(g), "total": shown(&total), "fan_out": shared });
                        totals[*input] = Some(total);
                        entry
                    })
                    .collect();
                json!({ "node": step.node, "grad": shown(&step.grad_output), "contributions": contributions })
            })
            .collect();
        let mut leaves = Vec::new();
        for (id, estimate) in &options.finite_differences {
            let index = index_of(*id)?;
            let analytic = grads
                .get(vars[index])
                .map(|g| g.iter().map(|v| v.as_f64()).collect::<Vec<_>>());
            leaves.push(json!({
                "node": index,
                "name": names[index],
                "analytic": analytic.unwrap_or_default().iter().map(|&v| sig6(v)).collect::<Vec<_>>(),
                "numeric": estimate.iter().map(|&v| sig6(v)).collect::<Vec<_>>(),
            }));
        }
        let data = json!({
            "title": options.title,
            "description": options.description,
            "nodes": nodes,
            "backward": backward,
            "leaves": leaves,
        });
        Ok(page(&options.title, &data))
    }
}

fn node_json<T: Element>(
    var: &Var<'_, T>,
    grads: &Gradients<T>,
    (names, depth): (&[String], usize),
    rule: String,
) -> Value {
    let op = var.op_name();
    let kind = match op.as_str() {
        "var" | "const" if var.inputs().is_empty() => op.clone(),
        _ => "op".to_string(),
    };
    json!({
        "id": var.index(),
        "op": op,
        "kind": kind,
        "name": names[var.index()],
        "shape": var.shape(),
        "depth": depth,
        "inputs": var.inputs(),
        "value": shown(&var.value()),
        "grad": grads.get(*var).map(shown),
        "rule": rule,
    })
}

/// The HTML document: the data as JSON in a script element, then the page's own CSS and
/// JavaScript (from `html/page.css` and `html/page.js`).
fn page(title: &str, data: &Value) -> String {
    let mut out = String::new();
    let escape = |s: &str| s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;");
    // JSON inside <script>: only "</" could end the element early.
    let json = data.to_string().replace("</", "<\\/");
    let _ = write!(
        out,
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<title>{}</title>\n<style>\n{}</style>\n</head>\n<body>\n{}\n<script id=\"tape-data\" type=\"application/json\">{json}</script>\n<script>\n{}</script>\n</body>\n</html>\n",
        escape(title),
        include_str!("html/page.css"),
        include_str!("html/body.html"),
        include_str!("html/page.js"),
    );
    out
}

/// Central differences of `Σ upstream · f(inputs)` with respect to every element of every input,
/// step `h`: the estimates [`HtmlOptions::finite_differences`] shows beside the tape's
/// gradients. `f` builds the output on a fresh tape from the inputs as variables, as for
/// [`check_gradients`](crate::check_gradients).
///
/// # Errors
/// Whatever `f` returns, and [`TapeError::GradientShape`] if the output's shape is not
/// `upstream`'s.
pub fn finite_differences<F>(
    mut f: F,
    inputs: &[ArrayD<f64>],
    upstream: &ArrayD<f64>,
    h: f64,
) -> Result<Vec<ArrayD<f64>>>
where
    F: for<'t> FnMut(&'t Tape<f64>, &[Var<'t, f64>]) -> Result<Var<'t, f64>>,
{
    let mut loss = |working: &[ArrayD<f64>]| -> Result<f64> {
        let tape = Tape::new();
        let vars: Vec<_> = working.iter().map(|x| tape.var(x.clone())).collect();
        let value = f(&tape, &vars)?.value();
        if value.shape() != upstream.shape() {
            return Err(TapeError::GradientShape {
                op: "finite_differences".into(),
                what: "the output".into(),
                expected: value.shape().to_vec(),
                got: upstream.shape().to_vec(),
            });
        }
        Ok(value.iter().zip(upstream).map(|(y, w)| y * w).sum())
    };
    let mut working = inputs.to_vec();
    let mut estimates = Vec::with_capacity(inputs.len());
    for input in 0..inputs.len() {
        let mut estimate = ArrayD::zeros(inputs[input].raw_dim());
        for (index, slot) in estimate.indexed_iter_mut() {
            let original = working[input][&index];
            working[input][&index] = original + h;
            let plus = loss(&working)?;
            working[input][&index] = original - h;
            let minus = loss(&working)?;
            working[input][&index] = original;
            *slot = (plus - minus) / (2.0 * h);
        }
        estimates.push(estimate);
    }
    Ok(estimates)
}

#[cfg(test)]
mod tests;

//! Drawing the computation graph in Graphviz DOT.

use std::fmt::Write as _;

use crate::{Element, Tape};

impl<T: Element> Tape<T> {
    /// The graph recorded so far in Graphviz DOT: one node per tape entry labelled with its
    /// index, op name and shape (trainable variables as boxes, constants grey), and an edge
    /// from each input to its consumer. The nodes of each recorded backward ([`Tape::grad`]
    /// with `create_graph`) are drawn filled, in a dashed box of their own: the graph the chain
    /// rule built, beside the forward graph it reads. Render with `dot -Tsvg graph.dot -o
    /// graph.svg`.
    ///
    /// # Example
    /// ```
    /// use ndarray::array;
    ///
    /// let tape = tape::Tape::new();
    /// let x = tape.var(array![1.0, 2.0]);
    /// let _y = (x * x).sum();
    /// let dot = tape.to_dot();
    /// assert!(dot.contains("mul") && dot.contains("n0 -> n1"));
    /// ```
    pub fn to_dot(&self) -> String {
        let mut out = String::from("digraph tape {\n  rankdir=LR;\n  node [fontname=\"Helvetica\"];\n");
        let backwards = self.recorded_backwards();
        let vars = self.vars();
        let node = |out: &mut String, index: usize, filled: bool| {
            let var = vars[index];
            let (op, inputs) = (var.op_name(), var.inputs());
            let shape = format!("{:?}", var.shape());
            let style = match (op.as_str(), inputs.is_empty(), filled) {
                ("var", true, _) => "shape=box, style=bold",
                ("const", true, false) => "shape=box, color=grey, fontcolor=grey",
                ("const", true, true) => "shape=box, style=filled, fillcolor=\"#dbe9f6\", color=grey",
                (_, _, false) => "shape=ellipse",
                (_, _, true) => "shape=ellipse, style=filled, fillcolor=\"#dbe9f6\"",
            };
            // Writing to a String cannot fail.
            let _ = writeln!(out, "  n{index} [{style}, label=\"#{index} {op}\\n{shape}\"];");
        };
        let in_backward = |index: usize| backwards.iter().any(|range| range.contains(&index));
        for index in (0..vars.len()).filter(|&i| !in_backward(i)) {
            node(&mut out, index, false);
        }
        for (k, range) in backwards.iter().enumerate() {
            let _ = writeln!(
                out,
                "  subgraph cluster_backward_{k} {{\n  label=\"recorded backward {}\";\n  style=dashed;\n  fontname=\"Helvetica\";",
                k + 1
            );
            for index in range.clone() {
                node(&mut out, index, true);
            }
            out.push_str("  }\n");
        }
        for var in &vars {
            for input in var.inputs() {
                let _ = writeln!(out, "  n{input} -> n{};", var.index());
            }
        }
        out.push_str("}\n");
        out
    }
}

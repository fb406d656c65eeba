//! Drawing the computation graph in Graphviz DOT.

use std::fmt::Write as _;

use crate::{Element, Tape};

impl<T: Element> Tape<T> {
    /// The graph recorded so far in Graphviz DOT: one node per tape entry labelled with its
    /// index, op name and shape (trainable variables as boxes, constants grey), and an edge
    /// from each input to its consumer. Render with `dot -Tsvg graph.dot -o graph.svg`.
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
        for var in self.vars() {
            let (index, op, inputs) = (var.index(), var.op_name(), var.inputs());
            let shape = format!("{:?}", var.shape());
            let style = match (op.as_str(), inputs.is_empty()) {
                ("var", true) => "shape=box, style=bold",
                ("const", true) => "shape=box, color=grey, fontcolor=grey",
                _ => "shape=ellipse",
            };
            // Writing to a String cannot fail.
            let _ = writeln!(out, "  n{index} [{style}, label=\"#{index} {op}\\n{shape}\"];");
            for input in inputs {
                let _ = writeln!(out, "  n{input} -> n{index};");
            }
        }
        out.push_str("}\n");
        out
    }
}

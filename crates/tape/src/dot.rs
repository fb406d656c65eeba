//! Drawing the computation graph in Graphviz DOT.

use std::fmt::Write as _;

use crate::tape::NodeInfo;
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
        self.for_each_node(|index, info, value| {
            let shape = format!("{:?}", value.shape());
            // Writing to a String cannot fail.
            let _ = match info {
                NodeInfo::Variable => {
                    writeln!(
                        out,
                        "  n{index} [shape=box, style=bold, label=\"#{index} var\\n{shape}\"];"
                    )
                }
                NodeInfo::Constant => writeln!(
                    out,
                    "  n{index} [shape=box, color=grey, fontcolor=grey, label=\"#{index} const\\n{shape}\"];"
                ),
                NodeInfo::Op { name, inputs } => {
                    let _ = writeln!(
                        out,
                        "  n{index} [shape=ellipse, label=\"#{index} {name}\\n{shape}\"];"
                    );
                    inputs
                        .iter()
                        .try_for_each(|input| writeln!(out, "  n{input} -> n{index};"))
                }
            };
        });
        out.push_str("}\n");
        out
    }
}

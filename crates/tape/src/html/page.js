"use strict";
// Errors this page's script throws or logs, for tests and the console.
window.tapeErrors = [];
window.addEventListener("error", (event) => window.tapeErrors.push(String(event.message)));
window.addEventListener("unhandledrejection", (event) => window.tapeErrors.push(String(event.reason)));
const consoleError = console.error;
console.error = (...parts) => {
  window.tapeErrors.push(parts.map(String).join(" "));
  consoleError(...parts);
};
// The page's data is the tape as Rust wrote it (`Tape::to_html`): nodes in creation order, the
// backward steps in the order the backward pass ran, and the trainable leaves' gradients beside
// finite differences. Everything here only lays it out and steps through it.
(function () {
  const data = JSON.parse(document.getElementById("tape-data").textContent);
  const nodes = data.nodes;
  const SVG = "http://www.w3.org/2000/svg";
  const XHTML = "http://www.w3.org/1999/xhtml";
  const BOX = { width: 196, height: 150, column: 226, row: 162, margin: 20 };

  const steps = nodes.map((n) => ({ phase: "forward", node: n.id }))
    .concat(data.backward.map((b) => ({ phase: "backward", node: b.node, back: b })));
  let position = 0; // steps done: 0 before the first, steps.length after the last

  const text = (v) => (v === null || v === undefined ? "" : v.values ? "[" + v.values.join(", ") + "]" : v.summary);

  const title = (n) => "#" + n.id + " " + n.op + (n.name ? " (" + n.name + ")" : "");

  document.getElementById("title").textContent = data.title;
  document.getElementById("description").textContent = data.description;
  document.title = data.title;

  // Layout: a column per depth, nodes in creation order within a column.
  const rows = {};
  const place = nodes.map((n) => {
    const row = rows[n.depth] = (rows[n.depth] || 0) + 1;
    return { x: BOX.margin + n.depth * BOX.column, y: BOX.margin + (row - 1) * BOX.row };
  });
  const svg = document.getElementById("graph");
  const columns = Math.max(...nodes.map((n) => n.depth)) + 1;
  const height = Math.max(...Object.values(rows)) * BOX.row + 2 * BOX.margin;
  svg.setAttribute("width", columns * BOX.column + BOX.margin);
  svg.setAttribute("height", height);

  const edges = [];
  nodes.forEach((n) => n.inputs.forEach((input) => {
    const from = place[input], to = place[n.id];
    const path = document.createElementNS(SVG, "path");
    const x1 = from.x + BOX.width, y1 = from.y + BOX.height / 2, x2 = to.x, y2 = to.y + BOX.height / 2;
    const bend = (x2 - x1) / 2;
    path.setAttribute("d", `M${x1},${y1} C${x1 + bend},${y1} ${x2 - bend},${y2} ${x2},${y2}`);
    path.setAttribute("class", "edge");
    svg.appendChild(path);
    edges.push({ from: input, to: n.id, path });
  }));

  const boxes = nodes.map((n) => {
    const group = document.createElementNS(SVG, "g");
    group.setAttribute("data-node", n.id);
    const rect = document.createElementNS(SVG, "rect");
    rect.setAttribute("x", place[n.id].x);
    rect.setAttribute("y", place[n.id].y);
    rect.setAttribute("width", BOX.width);
    rect.setAttribute("height", BOX.height);
    rect.setAttribute("rx", n.kind === "op" ? 14 : 3);
    group.appendChild(rect);
    const object = document.createElementNS(SVG, "foreignObject");
    object.setAttribute("x", place[n.id].x);
    object.setAttribute("y", place[n.id].y);
    object.setAttribute("width", BOX.width);
    object.setAttribute("height", BOX.height);
    const label = document.createElementNS(XHTML, "div");
    label.setAttribute("class", "label");
    object.appendChild(label);
    group.appendChild(object);
    svg.appendChild(group);
    return { group, rect, label };
  });

  // The leaves' table, filled once: it does not change with the step.
  const leaves = document.querySelector("#leaves tbody");
  data.leaves.forEach((leaf) => {
    const row = document.createElement("tr");
    row.setAttribute("data-node", leaf.node);
    [title(nodes[leaf.node]), "[" + leaf.analytic.join(", ") + "]", "[" + leaf.numeric.join(", ") + "]"]
      .forEach((cell, i) => {
        const td = document.createElement("td");
        td.textContent = cell;
        td.className = ["leaf", "analytic", "numeric"][i];
        row.appendChild(td);
      });
    leaves.appendChild(row);
  });

  function render() {
    const forwardDone = Math.min(position, nodes.length);
    const backwardDone = Math.max(0, position - nodes.length);
    // Each node's gradient so far: the upstream gradient for the output, then running totals.
    const grads = nodes.map(() => null);
    data.backward.slice(0, backwardDone).forEach((b, i) => {
      if (i === 0) grads[b.node] = b.grad;
      b.contributions.forEach((c) => { grads[c.to] = c.total; });
    });
    const current = position > 0 ? steps[position - 1] : null;
    const targets = current && current.back ? current.back.contributions.map((c) => c.to) : [];
    nodes.forEach((n, i) => {
      const classes = ["node", n.kind === "op" ? "" : "leaf", n.kind === "const" ? "const" : ""];
      if (i < forwardDone) classes.push("done");
      if (current && current.node === i) classes.push("current");
      else if (targets.includes(i)) classes.push("target");
      boxes[i].rect.setAttribute("class", classes.join(" ").trim());
      if (current && current.node === i) boxes[i].group.scrollIntoView({ block: "nearest", inline: "nearest" });
      const known = i < forwardDone || n.kind !== "op";
      boxes[i].label.innerHTML = "";
      const line = (cls, content) => {
        const div = document.createElement("div");
        div.className = cls;
        div.textContent = content;
        boxes[i].label.appendChild(div);
      };
      line("op", title(n));
      line("muted", "shape [" + n.shape.join(", ") + "]");
      line("value", known ? "value " + text(n.value) : "value: not computed yet");
      if (grads[i]) line("grad", "grad " + text(grads[i]));
    });
    edges.forEach((e) => {
      const active = current && current.back && current.node === e.to && targets.includes(e.from);
      e.path.setAttribute("class", active ? "edge active" : "edge");
    });
    describe(current, grads);
    document.getElementById("position").textContent = position === 0
      ? "Start: press next (or the right arrow) to run the forward pass."
      : (current.phase === "forward" ? "Forward" : "Backward") + " step " + position + " of " + steps.length;
    document.getElementById("start").disabled = document.getElementById("prev").disabled = position === 0;
    document.getElementById("end").disabled = document.getElementById("next").disabled = position === steps.length;
  }

  function describe(current, grads) {
    const panel = document.getElementById("step");
    panel.innerHTML = "";
    const add = (tag, content, cls) => {
      const el = document.createElement(tag);
      el.textContent = content;
      if (cls) el.className = cls;
      panel.appendChild(el);
      return el;
    };
    if (!current) {
      add("p", nodes.length + " nodes, " + data.backward.length + " backward steps.");
      return;
    }
    const n = nodes[current.node];
    if (current.phase === "forward") {
      add("p", title(n) + (n.inputs.length ? " computed from " + n.inputs.map((i) => "#" + i).join(", ") : " is a leaf") + ":");
      add("p", text(n.value), "value");
      return;
    }
    const b = current.back;
    add("p", title(n) + " receives the gradient of the loss with respect to its value:");
    add("p", "g = " + text(b.grad), "value");
    add("p", n.rule || n.op + ": its own backward (a custom op)", "rule");
    const list = add("ul", "");
    b.contributions.forEach((c) => {
      const item = document.createElement("li");
      const target = nodes[c.to];
      item.textContent = "to " + title(target) + ": " + text(c.value) +
        (c.fan_out ? " (it feeds several ops: gradient so far " + text(c.total) + ")" : "");
      item.setAttribute("data-to", c.to);
      list.appendChild(item);
    });
    if (!b.contributions.length) add("p", "Nothing to send: no input needs a gradient.");
  }

  function go(to) {
    position = Math.max(0, Math.min(steps.length, to));
    render();
  }
  document.getElementById("start").addEventListener("click", () => go(0));
  document.getElementById("prev").addEventListener("click", () => go(position - 1));
  document.getElementById("next").addEventListener("click", () => go(position + 1));
  document.getElementById("end").addEventListener("click", () => go(steps.length));
  document.addEventListener("keydown", (event) => {
    const moves = { ArrowRight: position + 1, ArrowDown: position + 1, ArrowLeft: position - 1, ArrowUp: position - 1, Home: 0, End: steps.length };
    if (event.key in moves) {
      event.preventDefault();
      go(moves[event.key]);
    }
  });
  // For tests and the console: the step count, the position, and a way to move.
  window.tapePage = { steps: steps.length, position: () => position, go };
  // `#step=N` in the address opens the page at step N.
  const asked = /step=(\d+)/.exec(window.location.hash);
  go(asked ? Number(asked[1]) : 0);
})();

//! The page's data against the tape it was written from.

use ndarray::{ArrayD, array};
use serde_json::Value;

use super::*;

/// The JSON the page carries.
fn data_of(page: &str) -> Value {
    let start = page.find("type=\"application/json\">").unwrap() + "type=\"application/json\">".len();
    let end = start + page[start..].find("</script>").unwrap();
    serde_json::from_str(&page[start..end].replace("<\\/", "</")).unwrap()
}

#[test]
fn the_page_replays_the_tape_and_shows_sums_at_a_fan_out() {
    let tape = Tape::<f64>::new();
    let x = tape.var(array![0.5, -1.5]);
    let w = tape.var(array![2.0, 3.0]);
    let y = (x * w + x.tanh()).sum(); // x feeds mul and tanh
    let _later = w.exp(); // after the output: not part of its graph, so w does not fan out
    let h = 1e-6;
    let estimates = finite_differences(
        |_, v| Ok((v[0] * v[1] + v[0].tanh()).sum()),
        &[x.value().as_ref().clone(), w.value().as_ref().clone()],
        &ndarray::arr0(1.0).into_dyn(),
        h,
    )
    .unwrap();
    let options = HtmlOptions {
        title: "x · w + tanh x </script>".into(),
        description: "a fan-out".into(),
        names: vec![(x.id(), "x".into()), (w.id(), "w".into())],
        finite_differences: vec![(x.id(), estimates[0].clone()), (w.id(), estimates[1].clone())],
    };
    let page = tape.to_html(y, ndarray::arr0(1.0).into_dyn(), &options).unwrap();
    // Self-contained: nothing is fetched, and the title cannot close the script early.
    assert!(!page.contains("<link") && !page.contains("src="));
    assert_eq!(page.matches("</script>").count(), 2);
    let data = data_of(&page);
    let nodes = data["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), tape.len() - 1, "the nodes up to the output");
    assert_eq!(nodes[x.index()]["name"], "x");
    assert_eq!(nodes[2]["op"], "mul");
    assert_eq!(nodes[2]["rule"], rule("mul"));
    // The backward steps in the order backward ran: from the sum back.
    let order: Vec<u64> = data["backward"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["node"].as_u64().unwrap())
        .collect();
    assert_eq!(order, [5, 4, 3, 2]);
    // x gets two contributions; the second shows the sum, which is the tape's gradient.
    let grads = y.backward().unwrap();
    let to_x: Vec<&Value> = data["backward"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|b| b["contributions"].as_array().unwrap())
        .filter(|c| c["to"] == x.index())
        .collect();
    assert_eq!(to_x.len(), 2);
    assert!(to_x.iter().all(|c| c["fan_out"] == true));
    let to_w: Vec<&Value> = data["backward"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|b| b["contributions"].as_array().unwrap())
        .filter(|c| c["to"] == w.index())
        .collect();
    assert_eq!(to_w.len(), 1);
    assert_eq!(to_w[0]["fan_out"], false);
    let expected: Vec<String> = grads.wrt(x).unwrap().iter().map(|&g| sig6(g)).collect();
    assert_eq!(to_x[1]["total"]["values"], serde_json::json!(expected));
    // The leaves' table: the tape's gradient and the estimate agree to the digits shown.
    let leaves = data["leaves"].as_array().unwrap();
    assert_eq!(leaves.len(), 2);
    for leaf in leaves {
        let (a, n) = (
            leaf["analytic"].as_array().unwrap(),
            leaf["numeric"].as_array().unwrap(),
        );
        for (a, n) in a.iter().zip(n) {
            let (a, n): (f64, f64) = (
                a.as_str().unwrap().parse().unwrap(),
                n.as_str().unwrap().parse().unwrap(),
            );
            assert!((a - n).abs() <= 1e-5 * a.abs().max(1.0), "{a} vs {n}");
        }
    }
}

#[test]
fn large_tensors_are_summarised_and_numbers_have_six_digits() {
    assert_eq!(sig6(1.0 / 3.0), "0.333333");
    assert_eq!(sig6(-1234.56789), "-1234.57");
    assert_eq!(sig6(2.5e-7), "2.50000e-7");
    assert_eq!(sig6(0.0), "0");
    let big = ArrayD::from_shape_fn(ndarray::IxDyn(&[4, 4]), |i| (i[0] * 4 + i[1]) as f64);
    let v = shown(&big);
    assert_eq!(v["summary"], "mean 7.50000 · min 0 · max 15.0000");
    let small = shown(&array![1.5, -2.0].into_dyn());
    assert_eq!(small["values"], serde_json::json!(["1.50000", "-2.00000"]));
}

#[test]
fn names_from_another_tape_are_an_error() {
    let (tape, other) = (Tape::<f64>::new(), Tape::<f64>::new());
    let x = tape.var(array![1.0]);
    let stranger = other.var(array![1.0, 2.0, 3.0]);
    let options = HtmlOptions {
        names: vec![(stranger.id(), "s".into())],
        ..HtmlOptions::default()
    };
    let error = tape
        .to_html(x.sum(), ndarray::arr0(1.0).into_dyn(), &options)
        .unwrap_err();
    assert!(matches!(error, TapeError::ForeignVar { .. }));
}

#[test]
fn a_custom_op_shows_its_own_rule() {
    struct Cube;
    impl crate::Function<f64> for Cube {
        fn name(&self) -> &str {
            "cube"
        }
        fn rule(&self) -> &str {
            "cube: ∂/∂x = 3x²·g"
        }
        fn forward(&mut self, inputs: &[ndarray::ArrayViewD<'_, f64>]) -> Result<ArrayD<f64>> {
            Ok(inputs[0].mapv(|x| x * x * x))
        }
        fn backward(&self, args: &crate::BackwardArgs<'_, f64>) -> Result<Vec<Option<ArrayD<f64>>>> {
            Ok(vec![Some(
                &args.grad_output * &args.inputs[0].mapv(|x| 3.0 * x * x),
            )])
        }
    }
    let tape = Tape::<f64>::new();
    let x = tape.var(array![2.0]);
    let y = tape.apply(Cube, &[x]).unwrap().sum();
    let page = tape
        .to_html(y, ndarray::arr0(1.0).into_dyn(), &HtmlOptions::default())
        .unwrap();
    let data = data_of(&page);
    assert_eq!(data["nodes"][1]["rule"], "cube: ∂/∂x = 3x²·g");
    assert_eq!(data["nodes"][2]["rule"], rule("sum"));
    assert_eq!(data["nodes"][0]["rule"], "");
}

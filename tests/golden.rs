//! PyTorch as the oracle: every case of `tests/data/pytorch_batchnorm.json`,
//! `tests/data/pytorch_conv_pool.json` and `tests/data/pytorch_layer_group_norm.json` (see their
//! README) recomputed here: BatchNorm through the functional API and through the layer on a
//! tape, conv, pooling, LayerNorm and GroupNorm through the fused nodes and their compositions.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use bnorm::golden::{self, CaseKind, GoldenError, Normalized, check_case};

const GOLDEN: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/pytorch_batchnorm.json");
const CONV_POOL: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/pytorch_conv_pool.json");
const NORM: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/data/pytorch_layer_group_norm.json"
);
const DOUBLE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/data/pytorch_batchnorm_double_backward.json"
);

fn cases() -> Vec<golden::Case> {
    golden::load(GOLDEN).expect("the vendored golden file parses")
}

fn conv_pool_cases() -> Vec<golden::Case> {
    golden::load(CONV_POOL).expect("the vendored golden file parses")
}

fn norm_cases() -> Vec<golden::Case> {
    golden::load(NORM).expect("the vendored golden file parses")
}

fn all_cases() -> Vec<golden::Case> {
    cases()
        .into_iter()
        .chain(conv_pool_cases())
        .chain(norm_cases())
        .collect()
}

#[test]
fn batchnorms_second_derivatives_match_pytorch_fused_and_composed() {
    let cases = golden::load(DOUBLE).expect("the vendored golden file parses");
    assert_eq!(cases.len(), 5);
    let mut evaluation = 0;
    for case in &cases {
        let CaseKind::DoubleBackward(double) = &case.kind else {
            panic!("{}: expected double_backward", case.name)
        };
        evaluation += usize::from(double.running.is_some());
        let report = check_case::<f64>(case).unwrap();
        let names: Vec<&str> = report.errors.iter().map(|(n, _)| n.as_str()).collect();
        let expected = ["dx", "dgamma", "dbeta", "d_x", "d_gamma", "d_dout"];
        let composed = expected.map(|name| format!("composed.{name}"));
        assert_eq!(names[..6], expected);
        assert_eq!(names[6..], composed.each_ref().map(String::as_str));
        assert!(report.max_error() <= 1e-10, "{report}");
        // The fused double backward in f32: its sums and statistics are f64.
        let report = check_case::<f32>(case).unwrap();
        assert_eq!(report.errors.len(), 6, "f32 checks the fused node only");
        assert!(report.max_error() <= 1e-5, "{report}");
    }
    assert_eq!(evaluation, 2, "training and evaluation mode");
    // A wrong second-order reference is reported.
    let mut case = cases[0].clone();
    let CaseKind::DoubleBackward(double) = &mut case.kind else {
        unreachable!()
    };
    let d_x = &mut double.expected[3].1.data;
    let largest = (0..d_x.len())
        .max_by(|&a, &b| d_x[a].abs().total_cmp(&d_x[b].abs()))
        .unwrap();
    d_x[largest] *= 1.0 + 1e-6;
    let report = check_case::<f64>(&case).unwrap();
    assert!(
        report
            .errors
            .iter()
            .filter(|(n, e)| n.ends_with("d_x") && *e > 1e-8)
            .count()
            == 2,
        "{report}"
    );
}

#[test]
fn the_norm_file_covers_both_kinds_with_and_without_affine() {
    let cases = norm_cases();
    assert_eq!(cases.len(), 9);
    let norms: Vec<_> = cases
        .iter()
        .filter_map(|case| match &case.kind {
            CaseKind::Norm(norm) => Some(norm),
            _ => None,
        })
        .collect();
    assert_eq!(norms.len(), 9);
    for kind in ["layer_norm", "group_norm"] {
        assert!(
            norms.iter().any(|n| n.kind_name() == kind && n.affine.is_none()),
            "{kind}"
        );
        assert!(
            norms.iter().any(|n| n.kind_name() == kind && n.affine.is_some()),
            "{kind}"
        );
    }
    assert!(
        norms
            .iter()
            .any(|n| n.normalized == Normalized::Layer(vec![4, 5]))
    );
    assert!(norms.iter().any(|n| n.normalized == Normalized::Groups(1)));
}

#[test]
fn a_wrong_norm_reference_is_reported_not_hidden() {
    let mut case = norm_cases().remove(0);
    let CaseKind::Norm(norm) = &mut case.kind else {
        panic!("the norm file holds only normalizations")
    };
    let (name, dweight) = &mut norm.expected[2];
    assert_eq!(*name, "dweight");
    dweight.data[3] *= 1.0 + 1e-6;
    let report = check_case::<f64>(&case).unwrap();
    for name in ["dweight", "composed.dweight"] {
        assert!(
            report.errors.iter().any(|(n, e)| n == name && *e > 1e-8),
            "{report}"
        );
    }
    assert!(report.errors.iter().any(|(n, e)| n == "dx" && *e <= 1e-12));
    // In f32 only the fused node is compared (the composition's f32 statistics lose digits).
    let report = check_case::<f32>(&case).unwrap();
    assert!(
        report.errors.iter().all(|(n, _)| !n.starts_with("composed.")),
        "{report}"
    );
    assert!(
        report.errors.iter().any(|(n, e)| n == "dweight" && *e > 1e-7),
        "{report}"
    );
}

#[test]
fn the_file_covers_training_sequences_and_every_layout() {
    let cases = cases();
    assert_eq!(cases.len(), 12);
    let ranks: Vec<usize> = cases
        .iter()
        .filter_map(|case| match &case.kind {
            CaseKind::Train(train) => Some(train.x.shape.len()),
            _ => None,
        })
        .collect();
    assert!(ranks.contains(&2) && ranks.contains(&3) && ranks.contains(&4));
    assert!(
        cases
            .iter()
            .any(|c| matches!(&c.kind, CaseKind::Sequence(s) if s.momentum.is_none()))
    );
}

#[test]
fn the_conv_file_covers_every_setting_and_both_pools() {
    let cases = conv_pool_cases();
    assert_eq!(cases.len(), 11);
    let kinds: Vec<&str> = cases.iter().map(|case| case.kind.name()).collect();
    for kind in ["conv2d", "max_pool2d", "avg_pool2d"] {
        assert!(kinds.contains(&kind), "{kind}");
    }
    let convs: Vec<_> = cases
        .iter()
        .filter_map(|case| match &case.kind {
            CaseKind::Conv2d(conv) => Some(conv),
            _ => None,
        })
        .collect();
    assert!(convs.iter().any(|c| c.options.groups > 1));
    assert!(convs.iter().any(|c| c.options.dilation != [1, 1]));
    assert!(convs.iter().any(|c| c.options.stride[0] != c.options.stride[1]));
    assert!(convs.iter().any(|c| c.bias.is_none()));
}

#[test]
fn every_case_matches_pytorch_to_1e_minus_10_in_f64() {
    for case in all_cases() {
        let report = check_case::<f64>(&case).unwrap();
        assert!(report.errors.len() >= 4, "{report}");
        assert!(report.max_error() <= 1e-10, "{report}");
    }
}

#[test]
fn conv_and_pool_cases_check_the_fused_and_the_composed_forms() {
    for case in conv_pool_cases() {
        let report = check_case::<f64>(&case).unwrap();
        let names: Vec<&str> = report.errors.iter().map(|(n, _)| n.as_str()).collect();
        assert!(
            names.contains(&"dx") && names.contains(&"composed.dx"),
            "{report}"
        );
        if let CaseKind::Conv2d(conv) = &case.kind {
            assert!(names.contains(&"composed.dweight"), "{report}");
            assert_eq!(names.contains(&"dbias"), conv.bias.is_some(), "{report}");
        }
    }
}

#[test]
fn a_wrong_conv_reference_is_reported_not_hidden() {
    let mut case = conv_pool_cases().remove(0);
    let CaseKind::Conv2d(conv) = &mut case.kind else {
        panic!("the first case is a convolution")
    };
    let (name, dweight) = &mut conv.expected[2];
    assert_eq!(*name, "dweight");
    dweight.data[5] *= 1.0 + 1e-6;
    let report = check_case::<f64>(&case).unwrap();
    assert!(
        report.errors.iter().any(|(n, e)| n == "dweight" && *e > 1e-8),
        "{report}"
    );
    assert!(
        report
            .errors
            .iter()
            .any(|(n, e)| n == "composed.dweight" && *e > 1e-8)
    );
    assert!(report.errors.iter().any(|(n, e)| n == "out" && *e <= 1e-12));
}

#[test]
fn every_case_matches_pytorch_to_1e_minus_5_in_f32() {
    for case in all_cases() {
        let report = check_case::<f32>(&case).unwrap();
        assert!(report.max_error() <= 1e-5, "{report}");
    }
}

#[test]
fn a_wrong_reference_is_reported_not_hidden() {
    let mut case = cases().remove(0);
    let CaseKind::Train(train) = &mut case.kind else {
        panic!("the first case is a training call")
    };
    let (name, dx) = &mut train.expected[1];
    assert_eq!(*name, "dx");
    dx.data[0] += 1e-6;
    let report = check_case::<f64>(&case).unwrap();
    assert!(report.max_error() > 1e-7, "{report}");
    assert!(report.errors.iter().any(|(n, e)| n == "dx" && *e > 1e-7));
}

fn format_problem(text: &str) -> String {
    match golden::parse(text) {
        Err(error @ (GoldenError::Format { .. } | GoldenError::Json(_))) => error.to_string(),
        other => panic!("expected a format error, got {other:?}"),
    }
}

#[test]
fn malformed_files_get_clear_errors() {
    assert!(format_problem("{").starts_with("not valid JSON"));
    assert_eq!(
        format_problem(r#"{"cases": 3}"#),
        "the file: expected an object with a \"cases\" array"
    );
    assert_eq!(
        format_problem(r#"{"cases": [{"name": "a", "kind": "train"}]}"#),
        "cases[0] (\"a\"): missing field \"eps\""
    );
    assert_eq!(
        format_problem(r#"{"cases": [{"name": "b", "kind": "test", "eps": 1e-5}]}"#),
        "cases[0] (\"b\").kind: expected \"train\", \"sequence\", \"conv2d\", \"max_pool2d\", \
         \"avg_pool2d\", \"layer_norm\", \"group_norm\" or \"double_backward\", got \"test\""
    );
    // A kind that is not a string said "got None".
    assert_eq!(
        format_problem(r#"{"cases": [{"name": "c", "kind": 7, "eps": 1e-5}]}"#),
        "cases[0] (\"c\").kind: expected \"train\", \"sequence\", \"conv2d\", \"max_pool2d\", \
         \"avg_pool2d\", \"layer_norm\", \"group_norm\" or \"double_backward\", got 7"
    );
    // Take a real case and break one array.
    let text = std::fs::read_to_string(GOLDEN).unwrap();
    let broken = text.replacen("\"data\": [0.35109996795654297, ", "\"data\": [", 1);
    assert_eq!(
        format_problem(&broken),
        "cases[0] (\"seed_example_1\").x: shape [3, 2] needs 6 values, data has 5"
    );
    let broken = text.replacen("\"shape\": [3, 2]", "\"shape\": [3, -2]", 1);
    assert!(format_problem(&broken).contains("expected {\"shape\": [whole numbers]"));
    // A shape whose product overflows usize: 2⁶³ · 2 wrapped to 0, then 2⁶³ + 3 times 2 to the
    // 6 values of the data; the golden example then panicked instead of exiting with 2.
    let huge = text.replacen("\"shape\": [3, 2]", "\"shape\": [9223372036854775811, 2]", 1);
    assert_eq!(
        format_problem(&huge),
        "cases[0] (\"seed_example_1\").x: shape [9223372036854775811, 2] is larger than an array can be"
    );
    // No values for a shape of 0 elements whose other sizes no array can have.
    let empty = text.replacen(
        "\"shape\": [3, 2], \"data\": [",
        "\"shape\": [0, 9223372036854775811], \"data\": [], \"old\": [",
        1,
    );
    assert_ne!(empty, text);
    assert!(
        format_problem(&empty).ends_with("shape [0, 9223372036854775811] is larger than an array can be")
    );
    // A count that is not a whole number >= 0 was cast (-1 became 0, 2.5 became 2).
    for count in ["-1", "2.5", "\"3\""] {
        let broken = text.replacen(
            "\"num_batches_tracked\": 1",
            &format!("\"num_batches_tracked\": {count}"),
            1,
        );
        assert_ne!(broken, text, "the file has a sequence case");
        assert!(
            format_problem(&broken).ends_with("num_batches_tracked: expected a whole number >= 0"),
            "{count}: {}",
            format_problem(&broken)
        );
    }
    // The conv kinds' settings.
    let conv = std::fs::read_to_string(CONV_POOL).unwrap();
    let broken = conv.replacen("\"stride\": [1, 1]", "\"stride\": [1]", 1);
    assert_eq!(
        format_problem(&broken),
        "cases[0] (\"conv_basic\").stride: expected [h, w], two whole numbers >= 0, got [1]"
    );
    let broken = conv.replacen("\"groups\": 1", "\"groups\": -1", 1);
    assert!(format_problem(&broken).ends_with("groups: expected a whole number >= 0"));
    let missing = golden::load("no/such/file.json").unwrap_err().to_string();
    assert!(missing.starts_with("cannot read no/such/file.json"), "{missing}");
}

#[test]
fn inputs_the_layer_rejects_are_reported_with_the_case() {
    let text = std::fs::read_to_string(GOLDEN).unwrap();
    // gamma of the first case with one element too many.
    let broken = text.replacen(
        "\"gamma\": {\"shape\": [2], \"data\": [0.7563397884368896, ",
        "\"gamma\": {\"shape\": [3], \"data\": [1.0, 0.7563397884368896, ",
        1,
    );
    let case = golden::parse(&broken).unwrap().remove(0);
    let error = check_case::<f64>(&case).unwrap_err().to_string();
    assert_eq!(
        error,
        "case \"seed_example_1\": gamma has 3 elements, expected 2 (channels of x)"
    );
}

#[test]
fn conv_inputs_the_layer_rejects_are_reported_with_the_case() {
    let conv = std::fs::read_to_string(CONV_POOL).unwrap();
    for (from, to, message) in [
        (
            "\"groups\": 1",
            "\"groups\": 2",
            "groups = 2 does not divide the 3 input channels of x",
        ),
        (
            "\"stride\": [1, 1]",
            "\"stride\": [0, 1]",
            "the stride must be at least 1",
        ),
    ] {
        let case = golden::parse(&conv.replacen(from, to, 1)).unwrap().remove(0);
        let error = check_case::<f64>(&case).unwrap_err().to_string();
        assert!(error.starts_with("case \"conv_basic\": "), "{error}");
        assert!(error.contains(message), "{error}");
    }
}

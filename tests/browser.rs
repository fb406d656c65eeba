//! The step-through pages in a real browser: Debian's Chromium, headless, driven by ChromeDriver
//! over WebDriver (the `fantoccini` client). For each page of `backprop_walkthrough --html` the
//! test clicks through every step (and checks the keys and the jumps), checks that each
//! trainable leaf's displayed gradient equals the tape's to 6 significant digits, that the page
//! logged no JavaScript error, and saves a screenshot to `docs/`.
//!
//! Needs `/usr/bin/chromium` and `/usr/bin/chromedriver` (`apt-get install chromium
//! chromium-driver`), so plain `cargo test` skips it; `.ci/run` runs it:
//! `cargo test --release --test browser -- --ignored`.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use bnorm::walkthrough::{self, Page};
use fantoccini::{Client, ClientBuilder, Locator, key::Key};
use serde_json::{Value, json};

/// ChromeDriver on a free port, stopped when dropped.
struct Driver {
    child: Child,
    port: u16,
}

impl Driver {
    fn start() -> Driver {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new("/usr/bin/chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver runs (apt-get install chromium chromium-driver)");
        Driver { child, port }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn connect(driver: &Driver, profile: &std::path::Path) -> Client {
    let args = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--window-size=1280,800",
    ]
    .map(String::from)
    .into_iter()
    .chain([format!("--user-data-dir={}", profile.display())])
    .collect::<Vec<_>>();
    let mut capabilities = serde_json::Map::new();
    capabilities.insert(
        "goog:chromeOptions".into(),
        json!({ "binary": "/usr/bin/chromium", "args": args }),
    );
    let connector = hyper_util::client::legacy::connect::HttpConnector::new();
    let url = format!("http://127.0.0.1:{}", driver.port);
    // ChromeDriver takes a moment to listen.
    for _ in 0..100 {
        if let Ok(client) = ClientBuilder::new(connector.clone())
            .capabilities(capabilities.clone())
            .connect(&url)
            .await
        {
            return client;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("no WebDriver session from chromedriver at {url}");
}

/// `v` to 6 significant digits, parsed back: what "equal to 6 significant digits" compares.
fn six_digits(v: f64) -> f64 {
    format!("{v:.5e}").parse().unwrap()
}

async fn check_page(client: &Client, page: &Page, file: &std::path::Path, screenshot_at: f64) -> Vec<u8> {
    std::fs::write(file, &page.html).unwrap();
    client.goto(&format!("file://{}", file.display())).await.unwrap();
    let steps = client
        .execute("return window.tapePage.steps", vec![])
        .await
        .unwrap()
        .as_u64()
        .unwrap();
    assert!(steps > 10, "{steps} steps");
    let next = client.find(Locator::Id("next")).await.unwrap();
    let position = || async {
        client
            .execute("return window.tapePage.position()", vec![])
            .await
            .unwrap()
    };
    // Every step by the button: the position moves one at a time and the panel describes it.
    for step in 1..=steps {
        next.click().await.unwrap();
        assert_eq!(position().await, json!(step));
        let text = client
            .find(Locator::Id("position"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(text.ends_with(&format!("step {step} of {steps}")), "{text}");
    }
    assert!(!next.is_enabled().await.unwrap(), "next is disabled at the end");
    // The keys and the jumps.
    let body = client.find(Locator::Css("body")).await.unwrap();
    body.send_keys(&Key::Home.to_string()).await.unwrap();
    assert_eq!(position().await, json!(0));
    body.send_keys(&Key::Right.to_string()).await.unwrap();
    body.send_keys(&Key::Right.to_string()).await.unwrap();
    body.send_keys(&Key::Left.to_string()).await.unwrap();
    assert_eq!(position().await, json!(1));
    client
        .find(Locator::Id("end"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    assert_eq!(position().await, json!(steps));
    client
        .find(Locator::Id("start"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    assert_eq!(position().await, json!(0));

    // Each leaf's gradient as displayed, against the tape's.
    let rows = client.find_all(Locator::Css("#leaves tbody tr")).await.unwrap();
    assert_eq!(rows.len(), page.leaves.len());
    for (row, (name, expected)) in rows.iter().zip(&page.leaves) {
        let leaf = row
            .find(Locator::Css("td.leaf"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(leaf.contains(&format!("({name})")), "{leaf} for {name}");
        let shown = row
            .find(Locator::Css("td.analytic"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let values: Vec<f64> = shown
            .trim_matches(['[', ']'])
            .split(',')
            .map(|v| v.trim().parse().unwrap())
            .collect();
        assert_eq!(values.len(), expected.len(), "{name}: {shown}");
        for (shown, &tape) in values.iter().zip(expected) {
            assert_eq!(
                six_digits(*shown),
                six_digits(tape),
                "{name}: shown {shown}, tape {tape}"
            );
        }
    }
    let errors: Value = client.execute("return window.tapeErrors", vec![]).await.unwrap();
    assert_eq!(errors, json!([]), "JavaScript errors");
    // The collector sees what the page logs: the check above could fail.
    let probe = "console.error('probe', 1); setTimeout(() => { throw new Error('thrown'); }); return 0";
    client.execute(probe, vec![]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let errors: Value = client.execute("return window.tapeErrors", vec![]).await.unwrap();
    assert_eq!(errors[0], json!("probe 1"));
    // A script injected on a file:// page reports its errors only as "Script error.".
    assert_eq!(errors.as_array().unwrap().len(), 2, "{errors}");
    client
        .execute("window.tapeErrors.length = 0", vec![])
        .await
        .unwrap();
    // A screenshot part-way through the backward pass.
    let at = (screenshot_at * steps as f64) as u64;
    client
        .execute("window.tapePage.go(arguments[0])", vec![json!(at)])
        .await
        .unwrap();
    client.screenshot().await.unwrap()
}

#[tokio::test(flavor = "current_thread")]
#[ignore = "needs chromium and chromedriver (apt-get install chromium chromium-driver); .ci/run runs it"]
async fn the_pages_step_through_backprop_in_chromium() {
    let dir = tempfile::tempdir().unwrap();
    let driver = Driver::start();
    let client = connect(&driver, &dir.path().join("profile")).await;
    let docs = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/");
    for (page, name, at) in [
        (walkthrough::batch_norm_page().unwrap(), "backprop", 0.72),
        (walkthrough::mlp_step_page().unwrap(), "backprop_mlp_step", 0.8),
    ] {
        let png = check_page(&client, &page, &dir.path().join(format!("{name}.html")), at).await;
        assert!(png.starts_with(b"\x89PNG"), "a PNG screenshot");
        std::fs::write(format!("{docs}{name}.png"), png).unwrap();
    }
    client.close().await.unwrap();
}

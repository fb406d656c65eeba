//! The main job: train an MLP and a CNN on real handwritten digits, each with and without
//! BatchNorm (and the MLP with LayerNorm in its place), at a normal and at a high learning rate,
//! and show what the normalization changes.
//!
//! ```sh
//! cargo run --release --example train                 # defaults finish in under a minute
//! cargo run --release --example train -- --model cnn  # only the CNN's runs
//! cargo run --release --example train -- --help       # steps, learning rates, batch size, seed, output folder
//! ```
//!
//! Prints a progress bar per run, then a table (test accuracy, steps to 90%, wall time), and
//! writes to the output folder: `accuracy.png` and `accuracy.svg` (test accuracy against steps,
//! a panel per model), `summary.json`, and each trained net as
//! `<model>[-bn|-ln]-lr<rate>.safetensors` (load it with `examples/predict`, or in PyTorch).

// Each step allocates and frees arrays; mimalloc reuses them (see examples/bench/main.rs).
#[cfg(not(feature = "system-alloc"))]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::error::Error;
use std::path::{Path, PathBuf};

use bnorm::layers::Module;
use bnorm::models::{Model, Norm};
use bnorm::train::{self, RunConfig, RunResult, Schedule};
use clap::{Parser, ValueEnum};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use layers::datasets::digits::{self, Standardizer};
use plotters::prelude::*;

/// Which nets to train.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Models {
    /// The 3 x 100 sigmoid MLP.
    Mlp,
    /// The two-layer CNN.
    Cnn,
    /// Both.
    All,
}

/// How the learning rate moves over a run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum ScheduleArg {
    /// The same rate at every step.
    Constant,
    /// A linear warm-up (--warmup steps) from a tenth of the rate, then cosine annealing to 0.
    WarmupCosine,
}

/// Train a 3 × 100 sigmoid MLP and a small CNN on handwritten digits, with and without
/// BatchNorm (and the MLP with LayerNorm).
#[derive(Parser, Debug)]
#[command(about, long_about = None, allow_negative_numbers = true)]
struct Args {
    /// The nets to train.
    #[arg(long, value_enum, default_value = "all")]
    model: Models,
    /// Optimisation steps per run (mini-batches).
    #[arg(long, default_value_t = 1500)]
    steps: usize,
    /// SGD learning rate of the first pair of runs (momentum 0.9).
    #[arg(long, default_value_t = 0.05)]
    lr: f64,
    /// Learning rate of the second pair of runs, to show BatchNorm tolerating a high one.
    #[arg(long, default_value_t = 1.0)]
    high_lr: f64,
    /// Images per mini-batch (60, as in the paper).
    #[arg(long, default_value_t = 60)]
    batch_size: usize,
    /// Learning-rate schedule of every run (peak: --lr or --high-lr).
    #[arg(long, value_enum, default_value = "warmup-cosine")]
    schedule: ScheduleArg,
    /// Warm-up steps of the warmup-cosine schedule (0: none).
    #[arg(long, default_value_t = 100)]
    warmup: usize,
    /// Clip the gradients to this global L2 norm before each step (0: no clipping).
    #[arg(long, default_value_t = 1.0)]
    clip_norm: f64,
    /// λ of one more MLP run with BatchNorm (at --lr) whose loss adds λ ‖∂loss/∂x‖², the squared
    /// norm of its gradient with respect to the input images (0: no such run).
    #[arg(long, default_value_t = 100.0)]
    grad_penalty: f64,
    /// Seed of the split, the initial weights and the batch order.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Measure test accuracy every this many steps.
    #[arg(long, default_value_t = 10)]
    eval_every: usize,
    /// Folder for accuracy.png, accuracy.svg and summary.json.
    #[arg(long, default_value = "out")]
    out: PathBuf,
    /// A gzipped CSV of digits, 64 pixels then the label per line [default: the digits bundled
    /// in the layers crate].
    #[arg(long)]
    data: Option<PathBuf>,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    // Every flag is checked before any work; a bad one exits with 2, as clap's own errors do.
    if let Err(error) = check(&args) {
        eprintln!("error: {error}");
        return std::process::ExitCode::from(2);
    }
    match run(&args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(Failure::Flag(error)) => {
            eprintln!("error: {error}");
            std::process::ExitCode::from(2)
        }
        Err(Failure::Run(error)) => {
            eprintln!("error: {error}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Why `run` stopped: a flag that only the data shows to be bad (exit 2), or the work (exit 1).
enum Failure {
    Flag(String),
    Run(Box<dyn Error>),
}

impl<E: Into<Box<dyn Error>>> From<E> for Failure {
    fn from(error: E) -> Self {
        Failure::Run(error.into())
    }
}

/// Checks each flag, naming the first bad one and its value; creates the output folder and
/// checks that it can be written to, so that no training is lost to it at the end.
fn check(args: &Args) -> Result<(), String> {
    for (flag, value) in [
        ("--steps", args.steps),
        ("--batch-size", args.batch_size),
        ("--eval-every", args.eval_every),
    ] {
        if value == 0 {
            return Err(format!("{flag} must be at least 1, got 0"));
        }
    }
    for (flag, value) in [("--lr", args.lr), ("--high-lr", args.high_lr)] {
        if !(value.is_finite() && value > 0.0) {
            return Err(format!("{flag} must be a finite number > 0, got {value}"));
        }
    }
    if !(args.grad_penalty.is_finite() && args.grad_penalty >= 0.0) {
        return Err(format!(
            "--grad-penalty must be a finite number >= 0 (0: no such run), got {}",
            args.grad_penalty
        ));
    }
    if !(args.clip_norm.is_finite() && args.clip_norm >= 0.0) {
        return Err(format!(
            "--clip-norm must be a finite number >= 0 (0: no clipping), got {}",
            args.clip_norm
        ));
    }
    let out = &args.out;
    std::fs::create_dir_all(out).map_err(|e| format!("--out {}: cannot create it: {e}", out.display()))?;
    let probe = out.join(".train-write-check");
    std::fs::write(&probe, b"")
        .and_then(|()| std::fs::remove_file(&probe))
        .map_err(|e| format!("--out {}: cannot write there: {e}", out.display()))
}

fn run(args: &Args) -> Result<(), Failure> {
    let data = match &args.data {
        Some(path) => digits::load(path).map_err(|e| format!("--data: {e}"))?,
        None => digits::load_bundled()?,
    };
    let (train_raw, test_raw) = digits::split(&data, 0.2, args.seed)?;
    if args.batch_size > train_raw.len() {
        return Err(Failure::Flag(format!(
            "--batch-size must be at most the {} training images, got {}",
            train_raw.len(),
            args.batch_size
        )));
    }
    let scaler = Standardizer::fit(&train_raw);
    let (train_set, test_set) = (scaler.apply(&train_raw), scaler.apply(&test_raw));
    println!(
        "digits: {} training and {} test images (8x8, standardised on the training split); \
         SGD with momentum 0.9, batch {}",
        train_set.len(),
        test_set.len(),
        args.batch_size
    );
    let models = match args.model {
        Models::Mlp => vec![Model::Mlp],
        Models::Cnn => vec![Model::Cnn],
        Models::All => vec![Model::Mlp, Model::Cnn],
    };
    for &model in &models {
        println!("{model}: {}", model.build::<f32>(Norm::Batch, 0).describe());
    }
    let schedule = match args.schedule {
        ScheduleArg::Constant => Schedule::Constant,
        ScheduleArg::WarmupCosine => Schedule::WarmupCosine { warmup: args.warmup },
    };
    let clip_norm = (args.clip_norm != 0.0).then_some(args.clip_norm);
    println!(
        "learning rate: {}{}",
        match schedule {
            Schedule::Constant => "constant".to_string(),
            Schedule::WarmupCosine { warmup } => format!("{warmup} steps of warm-up, then cosine to 0"),
        },
        clip_norm.map_or(String::new(), |c| format!("; gradients clipped to norm {c}"))
    );

    let mut configs: Vec<RunConfig> = models
        .iter()
        .flat_map(|&model| {
            // The MLP also runs with LayerNorm in BatchNorm's place.
            let norms: &[Norm] = match model {
                Model::Mlp => &[Norm::None, Norm::Batch, Norm::Layer],
                Model::Cnn => &[Norm::None, Norm::Batch],
            };
            [args.lr, args.high_lr]
                .into_iter()
                .flat_map(|learning_rate| norms.iter().map(move |&norm| (learning_rate, norm)))
                .map(move |(learning_rate, norm)| RunConfig {
                    name: format!("{model} {} lr={learning_rate}", norm.label()),
                    model,
                    norm,
                    learning_rate,
                    schedule,
                    clip_norm,
                    steps: args.steps,
                    batch_size: args.batch_size,
                    seed: args.seed,
                    eval_every: args.eval_every,
                    input_grad_penalty: None,
                })
                .collect::<Vec<_>>()
        })
        .collect();
    // The MLP with BatchNorm once more, with a gradient penalty on the input.
    let with_bn = configs
        .iter()
        .find(|c| c.model == Model::Mlp && c.norm == Norm::Batch);
    if let Some(base) = with_bn.filter(|_| args.grad_penalty > 0.0).cloned() {
        let lambda = args.grad_penalty;
        let after_mlp = configs
            .iter()
            .rposition(|c| c.model == Model::Mlp)
            .map_or(0, |i| i + 1);
        let penalized = RunConfig {
            name: format!("{} + penalty {lambda}", base.name),
            input_grad_penalty: Some(lambda),
            ..base
        };
        configs.insert(after_mlp, penalized);
    }

    let bars = MultiProgress::new();
    let style =
        ProgressStyle::with_template("{prefix:>26} [{bar:30}] {pos:>5}/{len} steps  test accuracy {msg}")?
            .progress_chars("=> ");
    let mut results = Vec::new();
    for config in &configs {
        let bar = bars.add(
            ProgressBar::new(config.steps as u64)
                .with_style(style.clone())
                .with_prefix(config.name.clone()),
        );
        let result = train::run(config, &train_set, &test_set, |step, accuracy| {
            if step % 10 == 0 {
                bar.set_position(step as u64);
                bar.set_message(format!("{:.1}%", 100.0 * accuracy));
            }
        })?;
        match result.diverged_at {
            Some(step) => bar.abandon_with_message(format!("diverged at step {step}")),
            None => bar.finish_with_message(format!("{:.1}%", 100.0 * result.final_test_accuracy())),
        }
        results.push(result);
    }

    println!();
    print_table(&results);
    println!();

    let png = args.out.join("accuracy.png");
    let svg = args.out.join("accuracy.svg");
    let size = (960, 480 * models.len() as u32);
    plot(
        &results,
        &models,
        BitMapBackend::new(&png, size).into_drawing_area(),
    )?;
    plot(&results, &models, SVGBackend::new(&svg, size).into_drawing_area())?;
    let summary = args.out.join("summary.json");
    std::fs::write(
        &summary,
        serde_json::to_string_pretty(&train::summary_json(&results))? + "\n",
    )
    .map_err(|e| format!("cannot write {}: {e}", summary.display()))?;
    println!("wrote {}, {} and {}", shown(&png), shown(&svg), shown(&summary));
    let mut nets = Vec::new();
    for result in &results {
        let path = args.out.join(result.file_name());
        result.save(&path)?;
        nets.push(shown(&path));
    }
    println!("saved the trained nets: {}", nets.join(", "));
    Ok(())
}

/// The results as a table whose columns line up in a terminal (and read as Markdown).
fn print_table(results: &[RunResult]) {
    let header = [
        "model",
        "run",
        "learning rate",
        "final test accuracy",
        "steps to 90%",
        "mean ‖∂loss/∂x‖",
        "wall time",
    ];
    let rows: Vec<[String; 7]> = results
        .iter()
        .map(|r| {
            let mut run = match r.config.norm {
                Norm::None => "without normalization",
                Norm::Batch => "with BatchNorm",
                Norm::Layer => "with LayerNorm",
            }
            .to_string();
            if let Some(lambda) = r.config.input_grad_penalty {
                run += &format!(" + gradient penalty {lambda}");
            }
            let accuracy = match r.diverged_at {
                Some(step) => format!("diverged at step {step}"),
                None => format!("{:.1}%", 100.0 * r.final_test_accuracy()),
            };
            [
                r.config.model.to_string(),
                run,
                r.config.learning_rate.to_string(),
                accuracy,
                r.steps_to_90.map_or("never".to_string(), |s| s.to_string()),
                format!("{:.3}", r.input_grad_norm),
                format!("{:.2} s", r.seconds),
            ]
        })
        .collect();
    let widths: Vec<usize> = (0..header.len())
        .map(|i| {
            rows.iter()
                .map(|row| row[i].chars().count())
                .chain([header[i].chars().count()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    // The first two columns are left-aligned, the numbers right-aligned.
    let cell = |i: usize, text: &str| {
        if i < 2 {
            format!(" {text:<width$} ", width = widths[i])
        } else {
            format!(" {text:>width$} ", width = widths[i])
        }
    };
    let line = |cells: Vec<String>| format!("|{}|", cells.join("|"));
    println!(
        "{}",
        line(header.iter().enumerate().map(|(i, h)| cell(i, h)).collect())
    );
    let rule = |i: usize| {
        let dashes = "-".repeat(widths[i]);
        if i < 2 {
            format!(" {dashes} ")
        } else {
            format!(" {dashes}:")
        }
    };
    println!("{}", line((0..header.len()).map(rule).collect()));
    for row in &rows {
        println!(
            "{}",
            line(row.iter().enumerate().map(|(i, c)| cell(i, c)).collect())
        );
    }
}

fn shown(path: &Path) -> String {
    path.display().to_string()
}

/// Test accuracy against steps, a panel per model and a line per run (thick: with BatchNorm;
/// medium: with LayerNorm; thin: without).
fn plot<DB: DrawingBackend>(
    results: &[RunResult],
    models: &[Model],
    area: DrawingArea<DB, plotters::coord::Shift>,
) -> Result<(), Box<dyn Error>>
where
    DB::ErrorType: 'static,
{
    // Text is drawn with an embedded font, so no system font library is needed.
    plotters::style::register_font("sans-serif", FontStyle::Normal, dejavu::sans::regular())
        .map_err(|_| "cannot load the embedded font")?;
    area.fill(&WHITE)?;
    let panels = area.split_evenly((models.len(), 1));
    for (&model, panel) in models.iter().zip(&panels) {
        let runs: Vec<&RunResult> = results.iter().filter(|r| r.config.model == model).collect();
        let title = match model {
            Model::Mlp => "3 x 100 sigmoid MLP",
            Model::Cnn => "CNN: two 3x3 convolutions, max pooling, linear",
        };
        plot_panel(
            &runs,
            &format!("Test accuracy on handwritten digits: {title}"),
            panel,
        )?;
    }
    area.present()?;
    Ok(())
}

fn plot_panel<DB: DrawingBackend>(
    results: &[&RunResult],
    caption: &str,
    area: &DrawingArea<DB, plotters::coord::Shift>,
) -> Result<(), Box<dyn Error>>
where
    DB::ErrorType: 'static,
{
    let steps = results.iter().map(|r| r.config.steps).max().unwrap_or(1);
    let batch = results.first().map_or(0, |r| r.config.batch_size);
    let mut chart = ChartBuilder::on(area)
        .caption(caption, ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(64)
        .build_cartesian_2d(0..steps, 0.0..1.0)?;
    chart
        .configure_mesh()
        .x_desc(format!("training steps (mini-batches of {batch})"))
        .y_desc("test accuracy")
        .label_style(("sans-serif", 16))
        .y_label_formatter(&|v| format!("{:.0}%", v * 100.0))
        .draw()?;
    let colors = [
        RGBColor(31, 119, 180),
        RGBColor(214, 39, 40),
        RGBColor(44, 160, 44),
        RGBColor(148, 103, 189),
        RGBColor(255, 127, 14),
        RGBColor(23, 190, 207),
    ];
    // A run's color follows its normalization and learning rate, the same in every panel.
    let lowest = results
        .iter()
        .map(|r| r.config.learning_rate)
        .fold(f64::INFINITY, f64::min);
    for r in results {
        let norm = Norm::ALL.iter().position(|&n| n == r.config.norm).unwrap_or(0);
        let high = usize::from(r.config.learning_rate > lowest);
        let penalized = r.config.input_grad_penalty.is_some();
        let color = if penalized {
            BLACK
        } else {
            colors[(norm + Norm::ALL.len() * high) % colors.len()]
        };
        let width = match r.config.norm {
            Norm::None => 1,
            Norm::Batch => 3,
            Norm::Layer => 2,
        };
        let mut label = match r.config.norm {
            Norm::None => format!("without normalization, lr {}", r.config.learning_rate),
            norm => format!("with {}, lr {}", norm.label(), r.config.learning_rate),
        };
        if let Some(lambda) = r.config.input_grad_penalty {
            label += &format!(", gradient penalty {lambda}");
        }
        if let Some(step) = r.diverged_at {
            label += &format!(" (diverged at step {step})");
        }
        chart
            .draw_series(LineSeries::new(
                r.curve.iter().copied(),
                color.stroke_width(width),
            ))?
            .label(label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], color.stroke_width(width)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .label_font(("sans-serif", 16))
        .draw()?;
    Ok(())
}

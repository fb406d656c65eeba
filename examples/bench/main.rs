//! Times forward + backward on the tape, fused node against the same computation composed from
//! primitives: BatchNorm (beside the memory-traffic bound measured in the same run), and the
//! conv-net ops conv2d and max_pool2d, LayerNorm and GroupNorm; and a Hessian-vector product
//! beside a gradient (`--op hvp`: BatchNorm on its grid and the main job's MLP).
//!
//! ```sh
//! cargo run --release --example bench                      # the whole grid: BatchNorm f32 and f64, conv and pool f32
//! cargo run --release --example bench -- --quick           # a subset, fewer repetitions
//! cargo run --release --example bench -- --op batch_norm --dtype f32 --shape 4096x4096
//! cargo run --release --example bench -- --op conv2d --shape 60x16x8x8
//! ```
//!
//! Prints one JSON line per case on stdout. For BatchNorm:
//! `{"op": "batch_norm", "dtype": "f32", "shape": [4096, 4096], "fused_us": ..., "composed_us": ..., "fused_saved_bytes": ...,
//! "composed_saved_bytes": ..., "copy_gbps": ..., "traffic_bound_us": ...}`, where times are medians of
//! whole forward + backward passes (tape built, node run, gradients computed, everything freed;
//! fused and composed passes are timed in alternating stints, so both medians come from the same
//! minutes of machine time), `composed_us` is `null` above 20M elements, and `traffic_bound_us` is the time to move 7 reads + 2
//! writes of the input at `copy_gbps` (the best of a single- and a multi-threaded copy of 256 MiB,
//! counting bytes read plus bytes written). A readable summary goes to stderr. The main thread is
//! made one of rayon's pool threads (`--main-outside-pool` for rayon's default).
//!
//! For conv2d (kernel 3x3, padding 1) and max_pool2d (2x2, stride 2), with every gradient:
//! `{"op": "conv2d", "dtype": "f32", "shape": [60, 16, 8, 8], "out_channels": 32, "kernel": [3, 3],
//! "stride": [1, 1], "padding": [1, 1], "fused_us": ..., "composed_us": ..., "fused_saved_bytes": ...,
//! "composed_saved_bytes": ...}` (for pooling, `out_channels` is the input's channels).
//!
//! Feed the output to `benches/pytorch_reference.py --ours FILE` for the ratios to PyTorch.

mod batch_norm;
mod conv;
mod hvp;
mod norm;

// Every pass allocates and frees input-sized arrays. The system allocator returns them to the
// OS, so each new one pays a page fault per 4 KiB on first write (for large arrays more than the
// whole computation); a caching allocator reuses the pages, as a training loop wants.
// `--features system-alloc` measures with the system allocator instead.
#[cfg(not(feature = "system-alloc"))]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use ndarray::{ArrayD, IxDyn};
use rand::rngs::StdRng;
use rand_distr::{Distribution, StandardNormal};
use tape::Element;

/// The most timed runs of one kind of pass in one case, however short the pass.
const MAX_RUNS: usize = 10_000;

#[derive(Clone, Copy, Debug, PartialEq, ValueEnum)]
enum Dtype {
    F32,
    F64,
}

#[derive(Clone, Copy, Debug, PartialEq, ValueEnum)]
enum Op {
    BatchNorm,
    Conv2d,
    MaxPool2d,
    LayerNorm,
    GroupNorm,
    /// A Hessian-vector product beside a gradient: BatchNorm on its grid, and the MLP.
    Hvp,
}

/// Benchmark fused vs composed forward + backward: BatchNorm, conv2d and max_pool2d.
#[derive(Parser, Debug)]
struct Args {
    /// Only this op (repeat for several) [default: all].
    #[arg(long, value_enum)]
    op: Vec<Op>,
    /// Run a subset of the grid with fewer repetitions.
    #[arg(long)]
    quick: bool,
    /// Only this element type [default: f32 and f64 for BatchNorm, f32 for conv2d and pooling].
    #[arg(long, value_enum)]
    dtype: Option<Dtype>,
    /// Only this shape, as NxC or NxCxHxW (repeat for several): any shape for BatchNorm, the
    /// grid's input shapes for conv2d and max_pool2d.
    #[arg(long, value_parser = parse_shape)]
    shape: Vec<Vec<usize>>,
    /// Leave the main thread out of rayon's pool (rayon's default). Without this flag the main
    /// thread is made one of the pool's threads, as the calling thread is one of the threads of
    /// PyTorch's OpenMP team: a parallel loop then starts on the caller instead of waking a
    /// worker and putting the caller to sleep until it is done.
    #[arg(long)]
    main_outside_pool: bool,
}

fn parse_shape(text: &str) -> Result<Vec<usize>, String> {
    let shape: Vec<usize> = text
        .split(['x', ','])
        .map(|d| {
            d.trim()
                .parse::<usize>()
                .map_err(|_| format!("{d:?} in {text:?} is not a whole number"))
        })
        .collect::<Result<_, _>>()?;
    if !(2..=5).contains(&shape.len()) {
        return Err(format!(
            "{text:?} has rank {}, expected 2 to 5 (like 4096x4096)",
            shape.len()
        ));
    }
    if shape.contains(&0) {
        return Err(format!("{text:?} has a size of 0; every size must be at least 1"));
    }
    if shape
        .iter()
        .try_fold(1usize, |count, &size| count.checked_mul(size))
        .is_none()
    {
        return Err(format!("{text:?} is larger than an array can be"));
    }
    // Training-mode statistics need two values per channel: N times the spatial sizes.
    if shape[0] * shape[2..].iter().product::<usize>() < 2 {
        return Err(format!(
            "{text:?} has 1 value per channel, expected at least 2 (BatchNorm in training)"
        ));
    }
    Ok(shape)
}

/// Repetition budget: at least `min_runs`, and until `min_time` has passed (at most
/// [`MAX_RUNS`]).
#[derive(Clone, Copy)]
pub(crate) struct Budget {
    min_runs: usize,
    min_time: Duration,
}

/// Medians of the wall times of `run_a` and `run_b` (on fresh inputs from `setup()`, which is
/// not timed). They are timed in alternating stints, four of each, so both medians come from the
/// same minutes of machine time: on a shared VM the speed drifts by tens of percent within a
/// minute, and timing one after the other would put that drift into their ratio. Stints, not
/// single runs in turn: each kind of pass is timed in its own steady state (caches, allocator),
/// as a training loop repeating one graph runs it; the first run of a stint is not timed.
/// Without `run_b`, `run_a` alone, in the same stints.
pub(crate) fn medians_us<I>(
    budget: Budget,
    mut setup: impl FnMut() -> I,
    mut run_a: impl FnMut(I),
    mut run_b: Option<&mut dyn FnMut(I)>,
) -> (f64, Option<f64>) {
    const STINTS: usize = 4;
    let stint = Budget {
        min_runs: budget.min_runs.div_ceil(STINTS),
        min_time: budget.min_time / STINTS as u32,
    };
    let mut timed = |run: &mut dyn FnMut(I), times: &mut Vec<f64>| {
        run(setup()); // warm-up: page in code and buffers
        let start = Instant::now();
        let mut runs = 0;
        while runs < stint.min_runs || (start.elapsed() < stint.min_time && runs < MAX_RUNS / STINTS) {
            let input = setup();
            let t = Instant::now();
            run(input);
            times.push(t.elapsed().as_secs_f64() * 1e6);
            runs += 1;
        }
    };
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for _ in 0..STINTS {
        timed(&mut run_a, &mut a);
        if let Some(run_b) = run_b.as_mut() {
            timed(*run_b, &mut b);
        }
    }
    (median(a), (!b.is_empty()).then(|| median(b)))
}

fn median(mut times: Vec<f64>) -> f64 {
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

pub(crate) fn normal<T: Element>(shape: &[usize], rng: &mut StdRng) -> ArrayD<T> {
    ArrayD::from_shape_simple_fn(IxDyn(shape), || {
        let z: f64 = StandardNormal.sample(&mut *rng);
        T::from_f64_lossy(1.0 + 2.0 * z)
    })
}

fn main() {
    let args = Args::parse();
    let ops = if args.op.is_empty() {
        vec![
            Op::BatchNorm,
            Op::Conv2d,
            Op::MaxPool2d,
            Op::LayerNorm,
            Op::GroupNorm,
            Op::Hvp,
        ]
    } else {
        args.op.clone()
    };
    let bn_shapes: Vec<Vec<usize>> = if !args.shape.is_empty() {
        args.shape.clone()
    } else if args.quick {
        batch_norm::QUICK.iter().map(|s| s.to_vec()).collect()
    } else {
        batch_norm::GRID.iter().map(|s| s.to_vec()).collect()
    };
    // The conv-net cases of the grid, or those whose input shape was asked for.
    let asked = |shape: &[usize]| args.shape.is_empty() || args.shape.iter().any(|s| s == shape);
    let conv_count = if args.quick {
        conv::QUICK_CONV
    } else {
        conv::CONV.len()
    };
    let convs: Vec<([usize; 4], usize)> = conv::CONV[..conv_count]
        .iter()
        .copied()
        .filter(|(shape, _)| asked(shape))
        .collect();
    let pools: Vec<[usize; 4]> = conv::POOL.iter().copied().filter(|s| asked(s)).collect();
    let budget = if args.quick {
        Budget {
            min_runs: 3,
            min_time: Duration::from_millis(200),
        }
    } else {
        Budget {
            min_runs: 11,
            min_time: Duration::from_secs(1),
        }
    };
    if !args.main_outside_pool {
        // Before any parallel work: the global pool is built here, with this thread in it.
        if let Err(error) = rayon::ThreadPoolBuilder::new()
            .use_current_thread()
            .build_global()
        {
            eprintln!("error: could not make the main thread a pool thread: {error}");
            std::process::exit(2);
        }
    }
    let allocator = if cfg!(feature = "system-alloc") {
        "system"
    } else {
        "mimalloc"
    };
    let main_thread = if args.main_outside_pool {
        "main thread outside the pool"
    } else {
        "the main thread one of them"
    };
    eprintln!(
        "{} rayon threads ({main_thread}), {allocator} allocator",
        rayon::current_num_threads()
    );
    for op in ops {
        let dtypes = match (args.dtype, op) {
            (Some(dtype), _) => vec![dtype],
            (None, Op::BatchNorm) => vec![Dtype::F32, Dtype::F64],
            (None, _) => vec![Dtype::F32],
        };
        for dtype in dtypes {
            match op {
                Op::BatchNorm => {
                    let copy_gbps = batch_norm::copy_gbps();
                    eprintln!("copy bandwidth {copy_gbps:.2} GB/s (read + write)");
                    bn_shapes
                        .iter()
                        .map(|shape| match dtype {
                            Dtype::F32 => batch_norm::case::<f32>(shape, budget, copy_gbps),
                            Dtype::F64 => batch_norm::case::<f64>(shape, budget, copy_gbps),
                        })
                        .for_each(|line| println!("{line}"))
                }
                Op::Conv2d => convs
                    .iter()
                    .map(|&(shape, out)| match dtype {
                        Dtype::F32 => conv::conv_case::<f32>(shape, out, budget),
                        Dtype::F64 => conv::conv_case::<f64>(shape, out, budget),
                    })
                    .for_each(|line| println!("{line}")),
                Op::MaxPool2d => pools
                    .iter()
                    .map(|&shape| match dtype {
                        Dtype::F32 => conv::pool_case::<f32>(shape, budget),
                        Dtype::F64 => conv::pool_case::<f64>(shape, budget),
                    })
                    .for_each(|line| println!("{line}")),
                Op::LayerNorm => norm::LAYER_NORM
                    .iter()
                    .filter(|shape| asked(&shape[..]))
                    .map(|shape| match dtype {
                        Dtype::F32 => norm::case::<f32>(norm::Norm::Layer, shape, budget),
                        Dtype::F64 => norm::case::<f64>(norm::Norm::Layer, shape, budget),
                    })
                    .for_each(|line| println!("{line}")),
                Op::GroupNorm => norm::GROUP_NORM
                    .iter()
                    .filter(|(shape, _)| asked(&shape[..]))
                    .map(|&(shape, groups)| match dtype {
                        Dtype::F32 => norm::case::<f32>(norm::Norm::Group(groups), &shape, budget),
                        Dtype::F64 => norm::case::<f64>(norm::Norm::Group(groups), &shape, budget),
                    })
                    .for_each(|line| println!("{line}")),
                Op::Hvp => {
                    for shape in &bn_shapes {
                        println!(
                            "{}",
                            match dtype {
                                Dtype::F32 => hvp::bn_case::<f32>(shape, budget),
                                Dtype::F64 => hvp::bn_case::<f64>(shape, budget),
                            }
                        );
                    }
                    if args.shape.is_empty() {
                        println!(
                            "{}",
                            match dtype {
                                Dtype::F32 => hvp::mlp_case::<f32>(budget),
                                Dtype::F64 => hvp::mlp_case::<f64>(budget),
                            }
                        );
                    }
                }
            }
        }
    }
}

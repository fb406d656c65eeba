//! Times BatchNorm forward + backward on the tape: the fused node against the same computation
//! composed from primitives, beside the memory-traffic bound measured in the same run.
//!
//! ```sh
//! cargo run --release --example bench                      # the whole grid, f32 and f64
//! cargo run --release --example bench -- --quick           # a subset, fewer repetitions
//! cargo run --release --example bench -- --dtype f32 --shape 4096x4096
//! ```
//!
//! Prints one JSON line per case on stdout:
//! `{"dtype": "f32", "shape": [4096, 4096], "fused_us": ..., "composed_us": ..., "fused_saved_bytes": ...,
//! "composed_saved_bytes": ..., "copy_gbps": ..., "traffic_bound_us": ...}`, where times are medians of
//! whole forward + backward passes (tape built, node run, gradients computed, everything freed;
//! fused and composed passes are timed in alternating stints, so both medians come from the same
//! minutes of machine time), `composed_us` is `null` above 20M elements, and `traffic_bound_us` is the time to move 7 reads + 2
//! writes of the input at `copy_gbps` (the best of a single- and a multi-threaded copy of 256 MiB,
//! counting bytes read plus bytes written). A readable summary goes to stderr. The main thread is
//! made one of rayon's pool threads (`--main-outside-pool` for rayon's default).
//! Feed the output to `benches/pytorch_reference.py --ours FILE` for the ratios to PyTorch.

// Every pass allocates and frees input-sized arrays. The system allocator returns them to the
// OS, so each new one pays a page fault per 4 KiB on first write (for large arrays more than the
// whole computation); a caching allocator reuses the pages, as a training loop wants.
// `--features system-alloc` measures with the system allocator instead.
#[cfg(not(feature = "system-alloc"))]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::hint::black_box;
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use layers::{batch_norm, batch_norm_composed};
use ndarray::{Array1, ArrayD, IxDyn};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand_distr::{Distribution, StandardNormal};
use rayon::prelude::*;
use tape::{Element, Tape};

const GRID: [&[usize]; 7] = [
    &[8, 4],
    &[64, 64],
    &[256, 1024],
    &[1024, 64],
    &[4096, 4096],
    &[65536, 256],
    &[32, 64, 56, 56],
];
const QUICK: [&[usize]; 4] = [&[8, 4], &[64, 64], &[256, 1024], &[4096, 4096]];
const COMPOSED_MAX_ELEMENTS: usize = 20_000_000;
/// The most timed runs of one kind of pass in one case, however short the pass.
const MAX_RUNS: usize = 10_000;

#[derive(Clone, Copy, Debug, PartialEq, ValueEnum)]
enum Dtype {
    F32,
    F64,
}

/// Benchmark fused vs composed BatchNorm forward + backward.
#[derive(Parser, Debug)]
struct Args {
    /// Run a subset of the grid with fewer repetitions.
    #[arg(long)]
    quick: bool,
    /// Only this element type.
    #[arg(long, value_enum)]
    dtype: Option<Dtype>,
    /// Only this shape, as NxC or NxCxHxW (repeat for several).
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
struct Budget {
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
fn medians_us<I>(
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

/// Copy bandwidth in GB/s (bytes read + bytes written per second): the best of a single- and
/// a multi-threaded copy of a buffer far larger than the caches.
fn copy_gbps() -> f64 {
    let len = 256 << 20 >> 3; // 256 MiB of f64
    let source = vec![1.0f64; len];
    let mut target = vec![0.0f64; len];
    let bytes = 2.0 * (len * 8) as f64;
    let mut best = 0.0f64;
    for parallel in [false, true] {
        for _ in 0..5 {
            let t = Instant::now();
            if parallel {
                target
                    .par_chunks_mut(1 << 16)
                    .zip(source.par_chunks(1 << 16))
                    .for_each(|(t, s)| t.copy_from_slice(s));
            } else {
                target.copy_from_slice(&source);
            }
            black_box(&target);
            best = best.max(bytes / t.elapsed().as_secs_f64() / 1e9);
        }
    }
    best
}

fn normal<T: Element>(shape: &[usize], rng: &mut StdRng) -> ArrayD<T> {
    ArrayD::from_shape_simple_fn(IxDyn(shape), || {
        let z: f64 = StandardNormal.sample(&mut *rng);
        T::from_f64_lossy(1.0 + 2.0 * z)
    })
}

/// One forward + backward on a fresh tape; returns the bytes the tape kept for backward.
fn pass<T: Element>(
    composed: bool,
    (x, gamma, beta, dout): (ArrayD<T>, Array1<T>, Array1<T>, ArrayD<T>),
) -> usize {
    let tape = Tape::new();
    let (x, gamma, beta) = (tape.var(x), tape.var(gamma), tape.var(beta));
    let y = if composed {
        batch_norm_composed(x, gamma, beta, 1e-5)
    } else {
        batch_norm(x, gamma, beta, 1e-5)
    };
    let y = y.unwrap_or_else(|e| panic!("benchmark inputs are valid: {e}"));
    let saved = tape.saved_bytes();
    let grads = y
        .backward_with(dout)
        .unwrap_or_else(|e| panic!("benchmark gradient is valid: {e}"));
    black_box(grads.get(x).map(|g| g.len()));
    saved
}

fn case<T: Element>(shape: &[usize], budget: Budget, copy_gbps: f64) -> String {
    let mut rng = StdRng::seed_from_u64(0);
    let c = shape[1];
    let x = normal::<T>(shape, &mut rng);
    let dout = normal::<T>(shape, &mut rng);
    let (gamma, beta) = (Array1::<T>::ones(c), Array1::<T>::zeros(c));
    let inputs = || (x.clone(), gamma.clone(), beta.clone(), dout.clone());
    let elements = x.len();

    let fused_saved = pass::<T>(false, inputs());
    let fused = |i| {
        pass::<T>(false, i);
    };
    let (fused_us, composed_us, composed_saved) = if elements <= COMPOSED_MAX_ELEMENTS {
        let mut composed = |i| {
            pass::<T>(true, i);
        };
        let (fused_us, composed_us) = medians_us(budget, inputs, fused, Some(&mut composed));
        let saved = pass::<T>(true, inputs());
        let composed_us = composed_us.map_or("null".to_string(), |us| format!("{us:.1}"));
        (fused_us, composed_us, saved.to_string())
    } else {
        let (fused_us, _) = medians_us(budget, inputs, fused, None);
        (fused_us, "null".to_string(), "null".to_string())
    };
    let traffic_bound_us = 9.0 * (elements * std::mem::size_of::<T>()) as f64 / (copy_gbps * 1e9) * 1e6;
    eprintln!(
        "{:>4} {:<18} fused {:>10.1} us ({:>5.2} x traffic bound)   composed {:>10} us   saved bytes {} vs {}",
        T::NAME,
        format!("{shape:?}"),
        fused_us,
        fused_us / traffic_bound_us,
        composed_us,
        fused_saved,
        composed_saved
    );
    format!(
        "{{\"dtype\": \"{}\", \"shape\": {shape:?}, \"fused_us\": {fused_us:.1}, \"composed_us\": {composed_us}, \
         \"fused_saved_bytes\": {fused_saved}, \"composed_saved_bytes\": {composed_saved}, \"copy_gbps\": {copy_gbps:.2}, \
         \"traffic_bound_us\": {traffic_bound_us:.3}}}",
        T::NAME
    )
}

fn main() {
    let args = Args::parse();
    let shapes: Vec<Vec<usize>> = if !args.shape.is_empty() {
        args.shape.clone()
    } else if args.quick {
        QUICK.iter().map(|s| s.to_vec()).collect()
    } else {
        GRID.iter().map(|s| s.to_vec()).collect()
    };
    let dtypes: Vec<Dtype> = args.dtype.map_or(vec![Dtype::F32, Dtype::F64], |d| vec![d]);
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
    let copy_gbps = copy_gbps();
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
        "copy bandwidth {copy_gbps:.2} GB/s (read + write), {} rayon threads ({main_thread}), {allocator} allocator",
        rayon::current_num_threads()
    );
    for dtype in dtypes {
        for shape in &shapes {
            let line = match dtype {
                Dtype::F32 => case::<f32>(shape, budget, copy_gbps),
                Dtype::F64 => case::<f64>(shape, budget, copy_gbps),
            };
            println!("{line}");
        }
    }
}

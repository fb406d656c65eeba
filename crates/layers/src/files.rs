//! Model files: state dicts as [safetensors](https://huggingface.co/docs/safetensors) files, the
//! format PyTorch (`safetensors.torch.save_file`), candle, burn and dfdx read and write.
//!
//! - Float tensors are stored in the model's element type (`F32` for `f32`, `F64` for `f64`).
//!   Reading converts: an `F32` file loads into an `f64` model exactly, an `F64` file into an
//!   `f32` model rounded to nearest.
//! - `num_batches_tracked` is stored as `I64`, as PyTorch stores it; other integer, boolean or
//!   reduced-precision tensors are errors.
//! - The header's `__metadata__` is a string → string map; [`Sequential`](crate::Sequential)
//!   writes its architecture there (`{"arch": "cnn-bn"}`) when it has one.
//! - Writing is atomic: the file is written beside the target under a temporary name, flushed,
//!   then renamed over it, so a crash leaves the old file or the new one, never half of one.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

use safetensors::tensor::{Dtype, TensorView};
use tape::Element;

use crate::error::{Error, Result};
use crate::module::{Module, StateDict};
use crate::optim::Optimizer;

/// Whether `key` names a BatchNorm batch count, stored as an integer.
fn is_count(key: &str) -> bool {
    key == "num_batches_tracked" || key.ends_with(".num_batches_tracked")
}

/// A chunk of exactly `N` bytes as an array.
fn bytes<const N: usize>(chunk: &[u8]) -> [u8; N] {
    chunk
        .try_into()
        .unwrap_or_else(|_| unreachable!("chunks_exact gives {N} bytes"))
}

fn file_error(path: &Path, reason: impl std::fmt::Display) -> Error {
    Error::File {
        path: path.display().to_string(),
        reason: reason.to_string(),
    }
}

/// Writes `dict` to `path` as a safetensors file, with `metadata` in its header.
///
/// # Errors
/// [`Error::File`] when the file cannot be written (its folder does not exist, say); the target
/// is then unchanged.
///
/// # Example
/// ```
/// use layers::{Linear, Module, files};
/// use rand::SeedableRng;
///
/// let layer = Linear::<f32>::new(3, 2, &mut rand::rngs::StdRng::seed_from_u64(0));
/// let path = std::env::temp_dir().join(format!("linear-{}.safetensors", std::process::id()));
/// files::save_safetensors(&layer.state_dict(), &Default::default(), &path)?;
/// let (dict, metadata) = files::load_safetensors::<f64>(&path)?;
/// assert_eq!(dict["weight"].shape(), &[2, 3]);
/// assert!(metadata.is_empty());
/// # std::fs::remove_file(&path).unwrap();
/// # Ok::<(), layers::Error>(())
/// ```
pub fn save_safetensors<T: Element>(
    dict: &StateDict<T>,
    metadata: &HashMap<String, String>,
    path: impl AsRef<Path>,
) -> Result<()> {
    let path = path.as_ref();
    let float = if std::mem::size_of::<T>() == 4 {
        Dtype::F32
    } else {
        Dtype::F64
    };
    let bytes: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = dict
        .iter()
        .map(|(key, value)| {
            let (dtype, data) = if is_count(key) {
                (
                    Dtype::I64,
                    value
                        .iter()
                        .flat_map(|v| (v.as_f64() as i64).to_le_bytes())
                        .collect(),
                )
            } else if float == Dtype::F32 {
                (
                    float,
                    value
                        .iter()
                        .flat_map(|v| (v.as_f64() as f32).to_le_bytes())
                        .collect(),
                )
            } else {
                (
                    float,
                    value.iter().flat_map(|v| v.as_f64().to_le_bytes()).collect(),
                )
            };
            (key.clone(), dtype, value.shape().to_vec(), data)
        })
        .collect();
    let views = bytes
        .iter()
        .map(|(key, dtype, shape, data)| {
            TensorView::new(*dtype, shape.clone(), data)
                .map(|view| (key.as_str(), view))
                .map_err(|e| file_error(path, e))
        })
        .collect::<Result<Vec<_>>>()?;
    let metadata = (!metadata.is_empty()).then(|| metadata.clone());
    let buffer = safetensors::serialize(views, metadata).map_err(|e| file_error(path, e))?;
    let folder = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    let mut file = tempfile::NamedTempFile::new_in(folder).map_err(|e| file_error(path, e))?;
    file.write_all(&buffer)
        .and_then(|()| file.as_file().sync_all())
        .map_err(|e| file_error(path, e))?;
    file.persist(path).map_err(|e| file_error(path, e.error))?;
    Ok(())
}

/// Reads a safetensors file: its tensors as a state dict of `T`, and its header's metadata
/// (empty when it has none, as in PyTorch's files).
///
/// # Errors
/// [`Error::File`] when the path cannot be read (missing, a folder) or is not a safetensors file
/// (truncated, say); [`Error::TensorDtype`] for a tensor that is not `F32` or `F64` (or `I64`
/// for a `num_batches_tracked`).
pub fn load_safetensors<T: Element>(
    path: impl AsRef<Path>,
) -> Result<(StateDict<T>, HashMap<String, String>)> {
    let path = path.as_ref();
    let buffer = std::fs::read(path).map_err(|e| file_error(path, e))?;
    let file = safetensors::SafeTensors::deserialize(&buffer)
        .map_err(|e| file_error(path, format!("not a safetensors file: {e}")))?;
    let (_, header) = safetensors::SafeTensors::read_metadata(&buffer)
        .map_err(|e| file_error(path, format!("not a safetensors file: {e}")))?;
    let mut dict = StateDict::new();
    for (key, view) in file.iter() {
        let data = view.data();
        let values: Vec<T> = match view.dtype() {
            Dtype::F32 => data
                .chunks_exact(4)
                .map(|b| T::from_f64_lossy(f64::from(f32::from_le_bytes(bytes(b)))))
                .collect(),
            Dtype::F64 => data
                .chunks_exact(8)
                .map(|b| T::from_f64_lossy(f64::from_le_bytes(bytes(b))))
                .collect(),
            Dtype::I64 if is_count(key) => data
                .chunks_exact(8)
                .map(|b| T::from_f64_lossy(i64::from_le_bytes(bytes(b)) as f64))
                .collect(),
            other => {
                return Err(Error::TensorDtype {
                    key: key.to_string(),
                    got: format!("{other:?}"),
                });
            }
        };
        let array = ndarray::ArrayD::from_shape_vec(view.shape().to_vec(), values)
            .map_err(|e| file_error(path, format!("tensor {key:?}: {e}")))?;
        dict.insert(key.to_string(), array);
    }
    Ok((dict, header.metadata().clone().unwrap_or_default()))
}

/// The prefix of an optimizer's keys in a checkpoint.
const OPTIMIZER: &str = "optimizer.";

/// Saves a model and its optimizer in one safetensors file, atomically: the model's keys as
/// [`Module::state_dict`] gives them, the optimizer's ([`Optimizer::state_dict`]) behind
/// `optimizer.` (`optimizer.state.0.exp_avg`). Training resumed from it with
/// [`load_checkpoint`] takes the same steps as training that never stopped.
///
/// # Errors
/// As [`save_safetensors`].
pub fn save_checkpoint<T: Element>(
    model: &impl Module<T>,
    optimizer: &impl Optimizer<T>,
    metadata: &HashMap<String, String>,
    path: impl AsRef<Path>,
) -> Result<()> {
    let mut dict = model.state_dict();
    dict.extend(
        optimizer
            .state_dict()
            .into_iter()
            .map(|(key, value)| (format!("{OPTIMIZER}{key}"), value)),
    );
    save_safetensors(&dict, metadata, path)
}

/// Loads a checkpoint [`save_checkpoint`] wrote into a model (strictly) and its optimizer,
/// returning the file's metadata. Both are checked before either changes.
///
/// # Errors
/// As [`load_safetensors`], [`Module::load_state_dict`] and [`Optimizer::load_state_dict`].
pub fn load_checkpoint<T: Element>(
    model: &mut impl Module<T>,
    optimizer: &mut impl Optimizer<T>,
    path: impl AsRef<Path>,
) -> Result<HashMap<String, String>> {
    let (dict, metadata) = load_safetensors(path)?;
    let (optimizer_part, model_part): (StateDict<T>, StateDict<T>) =
        dict.into_iter().partition(|(key, _)| key.starts_with(OPTIMIZER));
    let optimizer_part = optimizer_part
        .into_iter()
        .map(|(key, value)| (key[OPTIMIZER.len()..].to_string(), value))
        .collect();
    model.check_state_dict(&model_part, true)?;
    optimizer.load_state_dict(&optimizer_part)?;
    model.load_state_dict(&model_part, true)?;
    Ok(metadata)
}

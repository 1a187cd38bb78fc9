//! Finding and opening a component's weight files, behind one `VarBuilder` factory.
//!
//! `*.safetensors` files are memory-mapped; PyTorch zip pickles (`pytorch_model.bin`,
//! `diffusion_pytorch_model.bin`) go through candle's pickle reader, which reads each tensor from the
//! archive when the model asks for it, so a model is never held twice in memory. A component folder may
//! hold one file or shards listed in a `*.index.json`; `variant` (e.g. `fp16`) selects
//! `name.fp16.safetensors` files as diffusers' `variant=` does. Safetensors are preferred over `.bin`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::pickle::PthTensors;
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use rayon::prelude::*;

use crate::error::{Error, Result, TensorContext};

/// The format of a component's weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightFormat {
    /// `*.safetensors`.
    Safetensors,
    /// PyTorch zip pickles (`*.bin`).
    Pickle,
}

/// The weight files of one component.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Weights {
    /// Their format.
    pub format: WeightFormat,
    /// The files (several when sharded).
    pub files: Vec<PathBuf>,
}

/// How a weight file name splits: `stem[.variant].ext`.
fn split_name(name: &str) -> Option<(&str, Option<&str>, WeightFormat)> {
    let (rest, format) = if let Some(r) = name.strip_suffix(".safetensors") {
        (r, WeightFormat::Safetensors)
    } else if let Some(r) = name.strip_suffix(".bin") {
        (r, WeightFormat::Pickle)
    } else {
        return None;
    };
    match rest.split_once('.') {
        None => Some((rest, None, format)),
        Some((stem, variant)) if !variant.contains('.') => Some((stem, Some(variant), format)),
        _ => None,
    }
}

/// Picks the weight files among the names in one component folder (e.g. a hub listing or a
/// directory): safetensors before `.bin`, the requested variant only, an index's shards when sharded.
/// Returns the chosen names (relative to the folder) and their format.
pub fn select_weight_names(
    names: &[String],
    variant: Option<&str>,
) -> Option<(WeightFormat, Vec<String>)> {
    for format in [WeightFormat::Safetensors, WeightFormat::Pickle] {
        let ext = match format {
            WeightFormat::Safetensors => "safetensors",
            WeightFormat::Pickle => "bin",
        };
        // Sharded: `stem.ext.index.json` or, with a variant, `stem.ext.index.variant.json`.
        let index_name = |n: &str| match variant {
            None => n.ends_with(&format!(".{ext}.index.json")),
            Some(v) => n.ends_with(&format!(".{ext}.index.{v}.json")),
        };
        if let Some(index) = names.iter().find(|n| index_name(n)) {
            return Some((format, vec![index.clone()]));
        }
        let mut files: Vec<String> = names
            .iter()
            .filter(|n| matches!(split_name(n), Some((_, v, f)) if f == format && v == variant))
            .cloned()
            .collect();
        if !files.is_empty() {
            files.sort();
            return Some((format, files));
        }
    }
    None
}

/// The weights of one component folder (`text_encoder/`, `unet/`, `vae/`).
pub fn find_weights(dir: &Path, variant: Option<&str>) -> Result<Weights> {
    let entries = std::fs::read_dir(dir).map_err(|source| Error::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_file())
        .filter_map(|e| e.file_name().to_str().map(str::to_string))
        .collect();
    let Some((format, chosen)) = select_weight_names(&names, variant) else {
        let what = match variant {
            Some(v) => format!("no `{v}` variant weights (*.{v}.safetensors or *.{v}.bin) found"),
            None => "no weights (*.safetensors or *.bin) found".to_string(),
        };
        return Err(Error::Model {
            path: dir.to_path_buf(),
            message: what,
        });
    };
    let files = if chosen[0].ends_with(".json") {
        shards_from_index(&dir.join(&chosen[0]))?
    } else {
        chosen.iter().map(|n| dir.join(n)).collect()
    };
    Ok(Weights { format, files })
}

/// The shard files named by a `*.index.json`.
pub fn shard_names(index: &Path) -> Result<Vec<String>> {
    let (value, _): (serde_json::Value, _) = crate::config::read_json(index)?;
    let map = value
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| Error::config(index, "weight_map", "missing or not an object"))?;
    let mut files: Vec<String> = map
        .values()
        .filter_map(|v| v.as_str())
        .map(str::to_string)
        .collect();
    files.sort();
    files.dedup();
    Ok(files)
}

fn shards_from_index(index: &Path) -> Result<Vec<PathBuf>> {
    let dir = index.parent().unwrap_or(Path::new("."));
    let files: Vec<PathBuf> = shard_names(index)?.iter().map(|f| dir.join(f)).collect();
    if let Some(missing) = files.iter().find(|f| !f.is_file()) {
        return Err(Error::Model {
            path: missing.clone(),
            message: format!("listed in {} but missing", index.display()),
        });
    }
    Ok(files)
}

/// Memory-mapped safetensors files whose pages are handed back to the OS as each tensor is copied
/// into its own buffer. candle's mmap loader keeps every touched page mapped until the whole
/// component is built, so a model's file pages and its tensors were resident together (the peak
/// memory of a run was set while loading); here the pages of a tensor are released once copied.
struct MappedSafetensors {
    files: Vec<MappedFile>,
    index: HashMap<String, (usize, TensorEntry)>,
}

struct MappedFile {
    map: memmap2::Mmap,
    data_start: usize,
    /// For private maps of single tensors (`alloc::mapped`).
    #[cfg_attr(not(target_os = "linux"), allow(dead_code))]
    file: std::fs::File,
}

#[derive(Clone)]
struct TensorEntry {
    dtype: DType,
    shape: Vec<usize>,
    start: usize,
    end: usize,
}

#[derive(serde::Deserialize)]
struct HeaderEntry {
    dtype: String,
    shape: Vec<usize>,
    data_offsets: (usize, usize),
}

fn safetensors_dtype(name: &str) -> Option<DType> {
    Some(match name {
        "F32" => DType::F32,
        "F16" => DType::F16,
        "BF16" => DType::BF16,
        "F64" => DType::F64,
        "I64" => DType::I64,
        "U32" => DType::U32,
        "U8" => DType::U8,
        _ => return None,
    })
}

impl MappedSafetensors {
    fn open(paths: &[PathBuf]) -> Result<Self> {
        let mut files = Vec::new();
        let mut index = HashMap::new();
        for (i, path) in paths.iter().enumerate() {
            let io = |source| Error::Io {
                path: path.clone(),
                source,
            };
            let file = std::fs::File::open(path).map_err(io)?;
            // SAFETY: mapped read-only; like every mmap-based loader we assume the file is not
            // truncated or rewritten while altdiff runs.
            let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
            let bad = |m: &str| Error::Model {
                path: path.clone(),
                message: format!("not a valid safetensors file ({m})"),
            };
            let len_bytes: [u8; 8] = map
                .get(..8)
                .and_then(|b| b.try_into().ok())
                .ok_or_else(|| bad("too short"))?;
            let header_len =
                usize::try_from(u64::from_le_bytes(len_bytes)).map_err(|_| bad("header size"))?;
            let header = map
                .get(8..8usize.saturating_add(header_len))
                .ok_or_else(|| bad("the header runs past the end of the file"))?;
            let header: HashMap<String, serde_json::Value> =
                serde_json::from_slice(header).map_err(|e| bad(&format!("header: {e}")))?;
            let data_start = 8 + header_len;
            let data_len = map.len() - data_start;
            for (name, v) in header {
                if name == "__metadata__" {
                    continue;
                }
                let e: HeaderEntry =
                    serde_json::from_value(v).map_err(|e| bad(&format!("tensor {name}: {e}")))?;
                let dtype = safetensors_dtype(&e.dtype).ok_or_else(|| {
                    bad(&format!("tensor {name}: dtype {} not supported", e.dtype))
                })?;
                let (start, end) = e.data_offsets;
                let expected = e.shape.iter().product::<usize>() * dtype.size_in_bytes();
                if start > end || end > data_len || end - start != expected {
                    return Err(bad(&format!(
                        "tensor {name} lies outside the file or has the wrong size (truncated?)"
                    )));
                }
                index.insert(
                    name,
                    (
                        i,
                        TensorEntry {
                            dtype,
                            shape: e.shape,
                            start,
                            end,
                        },
                    ),
                );
            }
            files.push(MappedFile {
                map,
                data_start,
                file,
            });
        }
        Ok(Self { files, index })
    }

    /// The tensor `name` on the CPU. When it is stored as `want`, a large one is a private map of
    /// the file's pages (`alloc::mapped`: no copy, no fresh memory) where the platform allows;
    /// otherwise it is copied out and the file's pages are handed back.
    fn load(&self, name: &str, want: Option<DType>) -> candle_core::Result<Tensor> {
        let (i, e) = self
            .index
            .get(name)
            .ok_or_else(|| candle_core::Error::CannotFindTensor {
                path: name.to_string(),
            })?;
        let f = &self.files[*i];
        let (a, b) = (f.data_start + e.start, f.data_start + e.end);
        if want == Some(e.dtype) {
            if let Some(t) = map_tensor(&f.file, a as u64, e.dtype, &e.shape) {
                return Ok(t);
            }
        }
        if want == Some(DType::BF16) && e.dtype == DType::F32 {
            if let Some(t) = f.narrowed(a, b, &e.shape) {
                return Ok(t);
            }
        }
        let t = Tensor::from_raw_buffer(&f.map[a..b], e.dtype, &e.shape, &Device::Cpu)?;
        #[cfg(unix)]
        // SAFETY: the map is private and read-only; dropped pages are read again from the file if
        // ever touched, so no data the program can observe changes.
        unsafe {
            let _ = f
                .map
                .unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, a, b - a);
        }
        Ok(t)
    }
}

impl MappedFile {
    /// The f32 values in bytes [a, b) rounded to a bf16 tensor of `shape` straight from the map,
    /// the file's pages handed back a chunk at a time: no f32 copy, and never more than a chunk of
    /// the file resident (the text encoder's 1 GB embedding table used to be resident three times
    /// over, file, f32 copy and bf16, which set bf16's peak memory). `None` if the bytes are not
    /// aligned for f32.
    fn narrowed(&self, a: usize, b: usize, shape: &[usize]) -> Option<Tensor> {
        /// Values per chunk (16 MiB of f32).
        const CHUNK: usize = 1 << 22;
        let bytes = &self.map[a..b];
        if !(bytes.as_ptr() as usize).is_multiple_of(4) || !bytes.len().is_multiple_of(4) {
            return None;
        }
        // SAFETY: aligned for f32 and a whole number of them (checked above), inside the map,
        // which lives as long as `self`; every bit pattern is an f32.
        let src =
            unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast::<f32>(), bytes.len() / 4) };
        use crate::kernels::convert::{filled, round_into_uninit};
        // A chunk a task: each one faults in its own fresh pages (a zero fill first would be one
        // more pass over them, on one thread).
        let round = |dst: &mut [std::mem::MaybeUninit<half::bf16>]| {
            let chunks = dst.par_chunks_mut(CHUNK).zip(src.par_chunks(CHUNK));
            chunks.enumerate().for_each(|(i, (d, s))| {
                round_into_uninit(s, d);
                #[cfg(unix)]
                // SAFETY: as in `load`: the map is private and read-only, dropped pages are read
                // again from the file if touched (the next chunk's first page may be).
                unsafe {
                    let _ = self.map.unchecked_advise_range(
                        memmap2::UncheckedAdvice::DontNeed,
                        a + i * CHUNK * 4,
                        s.len() * 4,
                    );
                }
            })
        };
        // SAFETY: the chunks cover `dst`, and `round_into_uninit` writes every element of each.
        let out = unsafe { filled(src.len(), round) };
        Tensor::from_vec(out, shape, &Device::Cpu).ok()
    }
}

/// The little-endian `dtype` tensor of `shape` at byte `offset` of `file` as a tensor over a
/// private map of the file, or `None` where that is not possible (see `alloc::mapped::map_vec`).
#[cfg(target_os = "linux")]
fn map_tensor(file: &std::fs::File, offset: u64, dtype: DType, shape: &[usize]) -> Option<Tensor> {
    use crate::alloc::mapped::map_vec;
    if cfg!(target_endian = "big") {
        return None;
    }
    let (n, cpu) = (shape.iter().product::<usize>(), &Device::Cpu);
    let t = match dtype {
        DType::F32 => Tensor::from_vec(map_vec::<f32>(file, offset, n)?, shape, cpu),
        DType::BF16 => Tensor::from_vec(map_vec::<half::bf16>(file, offset, n)?, shape, cpu),
        DType::F16 => Tensor::from_vec(map_vec::<half::f16>(file, offset, n)?, shape, cpu),
        _ => return None,
    };
    t.ok()
}

#[cfg(not(target_os = "linux"))]
fn map_tensor(_: &std::fs::File, _: u64, _: DType, _: &[usize]) -> Option<Tensor> {
    None
}

/// Where a weight backend finds a tensor by name; the `SimpleBackend` glue around it (the shape
/// check naming the tensor) is [`Backend`]'s, shared by all of them.
trait TensorSource: Send + Sync {
    /// The tensor `name` in `dtype` on `dev`.
    fn fetch(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor>;
    /// Whether the checkpoint has `name`.
    fn has(&self, name: &str) -> bool;
}

/// A [`TensorSource`] as a candle `VarBuilder` backend.
struct Backend<T>(T);

impl<T: TensorSource> SimpleBackend for Backend<T> {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        with_shape(self.0.fetch(name, dtype, dev)?, s, name)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.0.fetch(name, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.0.has(name)
    }
}

impl TensorSource for MappedSafetensors {
    fn fetch(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        // On the CPU in the run's dtype straight from the file (a map, or f32 rounded to bf16
        // from the map); elsewhere as stored, then moved and converted.
        let want = dev.is_cpu().then_some(dtype);
        converted(self.load(name, want)?, name, dtype, dev)
    }

    fn has(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }
}

/// A weight must be stored as floating point: an integer or boolean tensor where the network wants
/// weights is a broken checkpoint, not something to convert silently.
fn check_float(stored: DType, name: &str) -> candle_core::Result<()> {
    if stored.is_float() {
        Ok(())
    } else {
        Err(candle_core::Error::Msg(format!(
            "dtype mismatch for {name}: expected a floating-point tensor (f32, f16 or bf16), found {}",
            stored.as_str()
        )))
    }
}

/// A stored weight checked to be floating point, then moved to `dev` and converted to `dtype`.
fn converted(t: Tensor, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
    check_float(t.dtype(), name)?;
    t.to_device(dev)?.to_dtype(dtype)
}

/// Opens a PyTorch `.bin` checkpoint; a file that is not one (truncated, corrupted) is a model
/// error naming it.
fn open_pickle(file: &Path) -> Result<PthTensors> {
    PthTensors::new(file, None).map_err(|e| Error::Model {
        path: file.to_path_buf(),
        message: format!(
            "cannot read it as PyTorch weights ({e}); the file is truncated or corrupted: delete it and download it again"
        ),
    })
}

/// `t` if it has `shape`, else candle's shape-mismatch error naming the tensor.
fn with_shape(t: Tensor, shape: Shape, name: &str) -> candle_core::Result<Tensor> {
    if t.shape() != &shape {
        return Err(candle_core::Error::UnexpectedShape {
            msg: format!("shape mismatch for {name}"),
            expected: shape,
            got: t.shape().clone(),
        });
    }
    Ok(t)
}

/// Several PyTorch pickles seen as one set of tensors (sharded `.bin` checkpoints).
struct PickleShards {
    shards: Vec<PthTensors>,
    /// Per shard: the file and, by zip entry name, where each stored (uncompressed) entry's bytes
    /// start and how many there are; such tensors are mapped on the CPU instead of copied.
    stored: Vec<Option<StoredEntries>>,
}

struct StoredEntries {
    file: std::fs::File,
    entries: HashMap<String, (u64, u64)>,
}

impl StoredEntries {
    /// The stored entries of the zip `path` (PyTorch writes tensors uncompressed); `None` when the
    /// file cannot be read as a zip here (the ordinary reader then reports what is wrong).
    fn read(path: &Path) -> Option<Self> {
        let file = std::fs::File::open(path).ok()?;
        let mut zip = zip::ZipArchive::new(std::io::BufReader::new(file.try_clone().ok()?)).ok()?;
        let mut entries = HashMap::new();
        for i in 0..zip.len() {
            let Ok(entry) = zip.by_index_raw(i) else {
                continue;
            };
            if entry.compression() != zip::CompressionMethod::Stored {
                continue;
            }
            if let (Ok(name), Some(start)) = (entry.name(), entry.data_start()) {
                entries.insert(name.into_owned(), (start, entry.size()));
            }
        }
        Some(Self { file, entries })
    }
}

impl PickleShards {
    fn find(&self, name: &str) -> candle_core::Result<Tensor> {
        for shard in &self.shards {
            if let Some(t) = shard.get(name)? {
                return Ok(t);
            }
        }
        Err(candle_core::Error::CannotFindTensor {
            path: name.to_string(),
        })
    }
}

impl PickleShards {
    /// `map`: find the stored entries for mapping (the CPU only; elsewhere tensors are copied).
    fn new(shards: Vec<PthTensors>, files: &[PathBuf], map: bool) -> Self {
        let stored = files
            .iter()
            .map(|f| map.then(|| StoredEntries::read(f)).flatten())
            .collect();
        Self { shards, stored }
    }

    /// `name` as a private map of its file (`alloc::mapped`), when it is stored uncompressed,
    /// contiguous, from the start of its storage and in `dtype`.
    fn mapped(&self, name: &str, dtype: DType) -> Option<Tensor> {
        for (shard, stored) in self.shards.iter().zip(&self.stored) {
            let Some(info) = shard.tensor_infos().get(name) else {
                continue;
            };
            let layout = &info.layout;
            if info.dtype != dtype || !layout.is_contiguous() || layout.start_offset() != 0 {
                return None;
            }
            let stored = stored.as_ref()?;
            let &(start, size) = stored.entries.get(&info.path)?;
            let bytes = (layout.shape().elem_count() * dtype.size_in_bytes()) as u64;
            if bytes > size {
                return None;
            }
            return map_tensor(&stored.file, start, dtype, layout.dims());
        }
        None
    }
}

impl TensorSource for PickleShards {
    fn fetch(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        if dev.is_cpu() {
            if let Some(t) = self.mapped(name, dtype) {
                return Ok(t);
            }
        }
        converted(self.find(name)?, name, dtype, dev)
    }

    fn has(&self, name: &str) -> bool {
        self.shards
            .iter()
            .any(|s| s.tensor_infos().contains_key(name))
    }
}

/// Opens `weights` as a `VarBuilder` that yields tensors of `dtype` on `device`.
pub fn var_builder(
    weights: &Weights,
    dtype: DType,
    device: &Device,
) -> Result<VarBuilder<'static>> {
    match weights.format {
        WeightFormat::Safetensors => {
            // Each tensor is read when the network asks for it, so it is the network's alone: a
            // layer that turns its weight into another layout (bf16 linear layers pack W^T once)
            // frees the original at once, and tensors no network asks for (the VAE's encoder) are
            // never read. On the CPU a tensor stored in the run's dtype is a private map of the
            // file (no copy); see `MappedSafetensors::load`.
            Ok(VarBuilder::from_backend(
                Box::new(Backend(MappedSafetensors::open(&weights.files)?)),
                dtype,
                device.clone(),
            ))
        }
        WeightFormat::Pickle => {
            let shards = weights
                .files
                .iter()
                .map(|f| open_pickle(f))
                .collect::<Result<Vec<_>>>()?;
            Ok(VarBuilder::from_backend(
                Box::new(Backend(PickleShards::new(
                    shards,
                    &weights.files,
                    device.is_cpu(),
                ))),
                dtype,
                device.clone(),
            ))
        }
    }
}

/// Shapes and stored dtypes by tensor name, without reading any tensor data.
struct ShapeOnly {
    shapes: HashMap<String, (Vec<usize>, DType)>,
}

impl ShapeOnly {
    /// A zero-strided zero of `shape`: one element of memory whatever the shape.
    fn placeholder(shape: &[usize], dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        Tensor::zeros((), dtype, dev)?.broadcast_as(shape)
    }

    fn find(&self, name: &str) -> candle_core::Result<&[usize]> {
        let (shape, stored) =
            self.shapes
                .get(name)
                .ok_or_else(|| candle_core::Error::CannotFindTensor {
                    path: name.to_string(),
                })?;
        check_float(*stored, name)?;
        Ok(shape)
    }
}

impl TensorSource for ShapeOnly {
    fn fetch(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        Self::placeholder(self.find(name)?, dtype, dev)
    }

    fn has(&self, name: &str) -> bool {
        self.shapes.contains_key(name)
    }
}

/// A `VarBuilder` over the names and shapes of `weights` that reads no tensor data: a model built
/// from it holds zero-strided placeholders. Building each component from it at start-up finds a
/// missing tensor or a wrong shape before any work, when the real weights are only loaded later,
/// stage by stage.
pub fn shape_checker(
    weights: &Weights,
    dtype: DType,
    device: &Device,
) -> Result<VarBuilder<'static>> {
    let shapes = match weights.format {
        WeightFormat::Safetensors => MappedSafetensors::open(&weights.files)?
            .index
            .into_iter()
            .map(|(name, (_, e))| (name, (e.shape, e.dtype)))
            .collect(),
        WeightFormat::Pickle => {
            let mut shapes = HashMap::new();
            for f in &weights.files {
                for (name, info) in open_pickle(f)?.tensor_infos() {
                    shapes.insert(
                        name.clone(),
                        (info.layout.shape().dims().to_vec(), info.dtype),
                    );
                }
            }
            shapes
        }
    };
    Ok(VarBuilder::from_backend(
        Box::new(Backend(ShapeOnly { shapes })),
        dtype,
        device.clone(),
    ))
}

/// Every tensor of `weights`, by name (for `altdiff convert`).
pub fn load_all(weights: &Weights, device: &Device) -> Result<HashMap<String, Tensor>> {
    let what = || format!("reading {}", weights.files[0].display());
    let mut out = HashMap::new();
    for file in &weights.files {
        match weights.format {
            WeightFormat::Safetensors => {
                out.extend(candle_core::safetensors::load(file, device).context(what)?)
            }
            WeightFormat::Pickle => {
                let pth = PthTensors::new(file, None).context(what)?;
                let names: Vec<String> = pth.tensor_infos().keys().cloned().collect();
                for name in names {
                    if let Some(t) = pth.get(&name).context(what)? {
                        out.insert(name, t.to_device(device).context(what)?);
                    }
                }
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn prefers_safetensors_and_honours_variants() {
        let all = names(&[
            "config.json",
            "diffusion_pytorch_model.bin",
            "diffusion_pytorch_model.safetensors",
            "diffusion_pytorch_model.fp16.safetensors",
            "diffusion_pytorch_model.fp16.bin",
        ]);
        assert_eq!(
            select_weight_names(&all, None),
            Some((
                WeightFormat::Safetensors,
                names(&["diffusion_pytorch_model.safetensors"])
            ))
        );
        assert_eq!(
            select_weight_names(&all, Some("fp16")),
            Some((
                WeightFormat::Safetensors,
                names(&["diffusion_pytorch_model.fp16.safetensors"])
            ))
        );
        let bin_only = names(&["pytorch_model.bin", "config.json"]);
        assert_eq!(
            select_weight_names(&bin_only, None),
            Some((WeightFormat::Pickle, names(&["pytorch_model.bin"])))
        );
        assert_eq!(select_weight_names(&bin_only, Some("fp16")), None);
        let sharded = names(&[
            "model.safetensors.index.json",
            "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors",
        ]);
        assert_eq!(
            select_weight_names(&sharded, None),
            Some((
                WeightFormat::Safetensors,
                names(&["model.safetensors.index.json"])
            ))
        );
    }
}

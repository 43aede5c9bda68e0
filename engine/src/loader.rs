//! Loading a whole model: weights, tokenizer and chat template, from a GGUF file or a Hugging
//! Face directory, with a content digest that identifies the weights (for probe caching).

use std::io::Read;
use std::path::Path;

use candle_core::{DType, Device};
use sha2::{Digest, Sha256};

use crate::chat::ChatTemplate;
use crate::model::{invalid, weights, ModelConfig, ModelError, ModelSource, Transformer};
use crate::tokenizer::Tokenizer;

/// A model ready to run: the decoder, its tokenizer and chat template.
#[derive(Debug)]
pub struct LoadedModel {
    /// The decoder.
    pub transformer: Transformer,
    /// Its tokenizer.
    pub tokenizer: Tokenizer,
    /// Its chat template.
    pub chat_template: ChatTemplate,
    /// Where it came from.
    pub source: ModelSource,
    /// sha256 of the weight file(s).
    pub digest: String,
}

impl LoadedModel {
    /// The model configuration.
    pub fn config(&self) -> &ModelConfig {
        self.transformer.config()
    }
}

/// Loads a model onto `device`, with frozen weights in `dtype` (f32 on CPU, bf16 on CUDA).
pub fn load(
    source: &ModelSource,
    device: &Device,
    dtype: DType,
) -> Result<LoadedModel, ModelError> {
    let path = source.path();
    let (config, tensors, tokenizer, chat_template, digest) = match source {
        ModelSource::Gguf(path) => {
            let (mut file, content) = weights::read_gguf_header(path)?;
            let config = weights::gguf_config(path, &content)?;
            let tokenizer = Tokenizer::from_gguf(&content)
                .map_err(|e| invalid(path, format!("tokenizer: {e}")))?;
            let template = ChatTemplate::from_gguf(&content)
                .map_err(|e| invalid(path, format!("chat template: {e}")))?;
            let tensors = weights::gguf_tensors(path, &mut file, &content, &config)?;
            (
                config,
                tensors,
                tokenizer,
                template,
                file_digest(&[path.to_path_buf()])?,
            )
        }
        ModelSource::HfDir(dir) => {
            let config = weights::hf_config(dir)?;
            let tokenizer =
                Tokenizer::from_hf_dir(dir).map_err(|e| invalid(dir, format!("tokenizer: {e}")))?;
            let template = ChatTemplate::from_hf_dir(dir)
                .map_err(|e| invalid(dir, format!("chat template: {e}")))?;
            let tensors = weights::hf_tensors(dir)?;
            let mut files: Vec<_> = std::fs::read_dir(dir)
                .map_err(|source| ModelError::Io {
                    path: dir.clone(),
                    source,
                })?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|ext| ext == "safetensors"))
                .collect();
            files.sort();
            (config, tensors, tokenizer, template, file_digest(&files)?)
        }
    };
    let transformer = Transformer::new(config, tensors, dtype, device, path)?;
    Ok(LoadedModel {
        transformer,
        tokenizer,
        chat_template,
        source: source.clone(),
        digest,
    })
}

/// sha256 over the bytes of the files, in order.
pub fn file_digest(files: &[std::path::PathBuf]) -> Result<String, ModelError> {
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    for path in files {
        let mut file = std::fs::File::open(path).map_err(|source| ModelError::Io {
            path: path.clone(),
            source,
        })?;
        loop {
            let read = file.read(&mut buffer).map_err(|source| ModelError::Io {
                path: path.clone(),
                source,
            })?;
            if read == 0 {
                break;
            }
            hasher.update(&buffer[..read]);
        }
    }
    Ok(hex::encode(hasher.finalize()))
}

/// The default device: CUDA 0 when built with CUDA and a GPU is present, else the CPU.
pub fn default_device() -> Device {
    #[cfg(feature = "cuda")]
    {
        if let Ok(device) = cuda_device(0) {
            return device;
        }
    }
    Device::Cpu
}

/// CUDA device `index`, set up for the engine: cudarc's per-buffer event tracking is turned
/// off. That tracking orders uses of a buffer across streams by recording and waiting on an
/// event for every kernel argument; the engine issues everything on the device's one stream
/// (NCCL collectives included), where stream order already guarantees it, so those driver
/// calls were pure host overhead on every launch.
pub fn cuda_device(index: usize) -> candle_core::Result<Device> {
    let device = Device::new_cuda(index)?;
    #[cfg(feature = "cuda")]
    if let Device::Cuda(cuda) = &device {
        // SAFETY: every tensor of the engine lives and is used on this device's single stream
        // (see above), so no cross-stream synchronisation is needed.
        unsafe { cuda.disable_event_tracking() };
    }
    Ok(device)
}

/// Starts a new peak of live device allocations from what is allocated now (see
/// [`peak_allocated_bytes`]). Does nothing on the CPU.
pub fn reset_peak_allocated(device: &Device) -> candle_core::Result<()> {
    used_memory_high(device, true).map(|_| ())
}

/// The most bytes of device memory in live tensors at once since the last
/// [`reset_peak_allocated`] (the high-water mark of the stream-ordered pool candle allocates
/// from) — the measure PyTorch's `max_memory_allocated` gives, without the blocks the pool
/// keeps cached. `None` on the CPU, or where the driver has no stream-ordered allocator.
pub fn peak_allocated_bytes(device: &Device) -> candle_core::Result<Option<u64>> {
    used_memory_high(device, false)
}

/// Reads (or, with `reset`, restarts from the current usage) the used-memory high-water mark
/// of the pool candle's allocations on `device` come from: the CUDA device's current pool,
/// when the context allocates stream-ordered (`cuMemAllocAsync`).
#[cfg(feature = "cuda")]
fn used_memory_high(device: &Device, reset: bool) -> candle_core::Result<Option<u64>> {
    use candle_core::cuda_backend::cudarc::driver::{result, sys};
    let Device::Cuda(cuda) = device else {
        return Ok(None);
    };
    let stream = cuda.cuda_stream();
    let context = stream.context();
    if !context.has_async_alloc() {
        return Ok(None);
    }
    context.bind_to_thread().map_err(candle_core::Error::wrap)?;
    device.synchronize()?;
    let attribute = sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH;
    // Writing 0 resets the mark to the current usage, as the driver documents.
    let mut value: u64 = 0;
    // SAFETY: the device handle comes from a live context, so its pool is valid; the
    // attribute is one u64, read or written through `value`.
    unsafe {
        let pool =
            result::device::get_mem_pool(context.cu_device()).map_err(candle_core::Error::wrap)?;
        let value = (&mut value as *mut u64).cast();
        if reset {
            result::mem_pool::set_attribute(pool, attribute, value)
        } else {
            result::mem_pool::get_attribute(pool, attribute, value)
        }
    }
    .map_err(candle_core::Error::wrap)?;
    Ok(Some(value))
}

#[cfg(not(feature = "cuda"))]
fn used_memory_high(_device: &Device, _reset: bool) -> candle_core::Result<Option<u64>> {
    Ok(None)
}

/// The compute dtype for a device: bf16 on CUDA, f32 on the CPU.
pub fn default_dtype(device: &Device) -> DType {
    if device.is_cuda() {
        DType::BF16
    } else {
        DType::F32
    }
}

/// Whether a path looks like a model on disk (as opposed to a packaged model name).
pub fn is_path(spec: &str) -> bool {
    Path::new(spec).exists() || spec.contains('/') || spec.ends_with(".gguf")
}

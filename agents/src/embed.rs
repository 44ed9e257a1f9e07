//! Sentence embeddings with all-MiniLM-L6-v2 on candle's BERT, computed as
//! sentence-transformers does for this model: WordPiece tokens (at most
//! 256, the model's `max_seq_length`), mean pooling over the attention
//! mask, then L2 normalisation. 384 dimensions. Blocking: run it on the
//! inference pool.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config};
use tokenizers::{PaddingParams, Tokenizer, TruncationParams};

use crate::error::AgentError;

/// The public name of the model.
pub const EMBEDDING_MODEL: &str = "all-minilm-l6-v2";
/// Tokens per input beyond which the text is cut (as sentence-transformers does).
pub const MAX_TOKENS: usize = 256;

pub struct Embedder {
    model: BertModel,
    tokenizer: Tokenizer,
    device: Device,
    dims: usize,
}

fn model_err(e: impl std::fmt::Display) -> AgentError {
    AgentError::Model(format!("embeddings: {e}"))
}

fn inference(e: impl std::fmt::Display) -> AgentError {
    AgentError::Inference(format!("embeddings: {e}"))
}

/// Embeddings of a batch and the tokens they read.
pub struct Embedded {
    pub vectors: Vec<Vec<f32>>,
    pub tokens: usize,
}

impl Embedder {
    pub fn load(dir: &Path) -> Result<Embedder, AgentError> {
        let config: Config = serde_json::from_slice(&std::fs::read(dir.join("config.json")).map_err(model_err)?).map_err(model_err)?;
        let mut tokenizer = Tokenizer::from_file(dir.join("tokenizer.json")).map_err(model_err)?;
        tokenizer.with_padding(Some(PaddingParams::default()));
        tokenizer.with_truncation(Some(TruncationParams { max_length: MAX_TOKENS, ..Default::default() })).map_err(model_err)?;
        let device = Device::Cpu;
        // SAFETY: the file is memory-mapped read-only and not changed while mapped.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[dir.join("model.safetensors")], DType::F32, &device) }.map_err(model_err)?;
        let model = BertModel::load(vb, &config).map_err(model_err)?;
        Ok(Embedder { model, tokenizer, device, dims: config.hidden_size })
    }

    pub fn dimensions(&self) -> usize {
        self.dims
    }

    /// One unit vector per text, in order.
    pub fn embed(&self, texts: &[String]) -> Result<Embedded, AgentError> {
        let encodings = self.tokenizer.encode_batch(texts.to_vec(), true).map_err(inference)?;
        let tokens = encodings.iter().map(|e| e.get_attention_mask().iter().filter(|&&m| m == 1).count()).sum();
        let ids: Vec<Tensor> = encodings.iter().map(|e| Tensor::new(e.get_ids(), &self.device)).collect::<Result<_, _>>().map_err(inference)?;
        let masks: Vec<Tensor> =
            encodings.iter().map(|e| Tensor::new(e.get_attention_mask(), &self.device)).collect::<Result<_, _>>().map_err(inference)?;
        let ids = Tensor::stack(&ids, 0).map_err(inference)?;
        let mask = Tensor::stack(&masks, 0).map_err(inference)?;
        let types = ids.zeros_like().map_err(inference)?;
        let hidden = self.model.forward(&ids, &types, Some(&mask)).map_err(inference)?;
        // Mean over the real tokens only.
        let mask_f = mask.to_dtype(DType::F32).and_then(|m| m.unsqueeze(2)).map_err(inference)?;
        let summed = hidden.broadcast_mul(&mask_f).and_then(|h| h.sum(1)).map_err(inference)?;
        let counts = mask_f.sum(1).map_err(inference)?;
        let mean = summed.broadcast_div(&counts).map_err(inference)?;
        let norm = mean.sqr().and_then(|s| s.sum_keepdim(1)).and_then(|s| s.sqrt()).map_err(inference)?;
        let unit = mean.broadcast_div(&norm).map_err(inference)?;
        let vectors = unit.to_vec2::<f32>().map_err(inference)?;
        Ok(Embedded { vectors, tokens })
    }
}

//! A `tokenizers` BPE tokenizer built from GGUF metadata (the vocabulary,
//! merges and token types that llama.cpp stores), so the model file is the
//! only file the LLM needs. SmolLM2 is GPT-2 style byte-level BPE with
//! single-digit splitting and no prefix space (candle's generic helper adds
//! one, which shifts every first word).


use candle_core::quantized::gguf_file::{Content, Value};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, Tokenizer};

use crate::error::AgentError;

/// llama.cpp token types: 3 = control (special), 4 = user-defined.
const TOKEN_TYPE_CONTROL: i32 = 3;

fn meta<'a>(content: &'a Content, key: &str) -> Result<&'a Value, AgentError> {
    content.metadata.get(key).ok_or_else(|| AgentError::Model(format!("gguf has no {key}")))
}

fn strings(v: &Value, key: &str) -> Result<Vec<String>, AgentError> {
    let arr = v.to_vec().map_err(|e| AgentError::Model(format!("{key}: {e}")))?;
    arr.iter().map(|s| s.to_string().cloned().map_err(|e| AgentError::Model(format!("{key}: {e}")))).collect()
}

pub fn from_gguf(content: &Content) -> Result<Tokenizer, AgentError> {
    let model = meta(content, "tokenizer.ggml.model")?.to_string().map_err(|e| AgentError::Model(e.to_string()))?;
    if model != "gpt2" {
        return Err(AgentError::Model(format!("tokenizer model {model} is not supported (byte-level BPE only)")));
    }
    let tokens = strings(meta(content, "tokenizer.ggml.tokens")?, "tokens")?;
    let merges = strings(meta(content, "tokenizer.ggml.merges")?, "merges")?;
    let types: Vec<i32> = match content.metadata.get("tokenizer.ggml.token_type") {
        Some(v) => v.to_vec().map_err(|e| AgentError::Model(e.to_string()))?.iter().map(|t| t.to_i32().unwrap_or(1)).collect(),
        None => vec![1; tokens.len()],
    };
    let vocab: tokenizers::models::bpe::Vocab = tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
    let merges: Vec<(String, String)> = merges
        .iter()
        .map(|m| m.split_once(' ').map(|(a, b)| (a.to_string(), b.to_string())).ok_or_else(|| AgentError::Model(format!("bad merge {m:?}"))))
        .collect::<Result<_, _>>()?;
    let bpe = BPE::builder().vocab_and_merges(vocab, merges).build().map_err(|e| AgentError::Model(format!("bpe: {e}")))?;
    let mut tok = Tokenizer::new(bpe);
    let pre = Sequence::new(vec![PreTokenizerWrapper::Digits(Digits::new(true)), PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, true))]);
    tok.with_pre_tokenizer(Some(pre));
    tok.with_decoder(Some(ByteLevelDecoder::default()));
    let specials: Vec<AddedToken> = tokens
        .iter()
        .zip(&types)
        .filter(|(_, t)| **t == TOKEN_TYPE_CONTROL)
        .map(|(s, _)| AddedToken::from(s.clone(), true))
        .collect();
    tok.add_special_tokens(&specials);
    Ok(tok)
}

//! The media crate's error type.

#[derive(Debug, thiserror::Error)]
pub enum MediaError {
    #[error("invalid SDP: {0}")]
    Sdp(String),
    #[error("no supported audio codec in the SDP (offered: {offered})")]
    NoCommonCodec { offered: String },
    #[error("codec: {0}")]
    Codec(String),
    #[error("resampler: {0}")]
    Resample(String),
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
}

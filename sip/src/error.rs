//! The SIP crate's error type.

#[derive(Debug, thiserror::Error)]
pub enum SipError {
    #[error("no SIP trunk named '{0}' is configured")]
    UnknownTrunk(String),
    #[error("no SIP trunk is configured")]
    NoTrunk,
    #[error("invalid number '{0}': expected E.164 like +14155550123")]
    InvalidNumber(String),
    #[error("SIP stack: {0}")]
    Stack(String),
    #[error("media: {0}")]
    Media(#[from] voxgate_media::MediaError),
}

impl From<rsipstack::Error> for SipError {
    fn from(e: rsipstack::Error) -> Self {
        SipError::Stack(e.to_string())
    }
}

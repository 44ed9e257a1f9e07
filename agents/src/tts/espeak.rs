//! espeak-ng as a voice: the fallback TTS that needs no model. The program
//! is run, not linked (libespeak-ng is GPL).

use tokio::process::Command;

use super::to_16k;
use crate::error::AgentError;

/// `text` spoken by `espeak-ng -v voice` as 16 kHz PCM. `speed` scales the
/// default 175 words per minute.
pub async fn espeak(text: &str, voice: &str, speed: f32) -> Result<Vec<i16>, AgentError> {
    let wpm = (175.0 * speed.clamp(0.5, 2.0)).round() as u32;
    let out = Command::new("espeak-ng")
        .args(["-v", voice, "-s", &wpm.to_string(), "--stdout", "--", text])
        .kill_on_drop(true)
        .output()
        .await
        .map_err(not_run)?;
    let (rate, pcm) = parse_wav(&succeeded(out)?.stdout)?;
    to_16k(&pcm, rate)
}

/// espeak-ng could not be started.
pub(crate) fn not_run(e: std::io::Error) -> AgentError {
    AgentError::Unavailable(format!("espeak-ng could not be run ({e}); install the espeak-ng package"))
}

/// A run of espeak-ng that exited well, or what it said on failing.
pub(crate) fn succeeded(out: std::process::Output) -> Result<std::process::Output, AgentError> {
    if out.status.success() {
        Ok(out)
    } else {
        Err(AgentError::Inference(format!("espeak-ng: {}", String::from_utf8_lossy(&out.stderr).trim())))
    }
}

/// The RIFF/WAVE that espeak-ng writes to a pipe: 16-bit mono PCM, with the
/// data size left unset (0 or 0xFFFFFFFF), so the data runs to the end.
pub(crate) fn parse_wav(bytes: &[u8]) -> Result<(u32, Vec<i16>), AgentError> {
    let bad = || AgentError::Inference("espeak-ng wrote an unexpected WAV".into());
    if bytes.len() < 12 || &bytes[..4] != b"RIFF" || &bytes[8..12] != b"WAVE" {
        return Err(bad());
    }
    let mut pos = 12;
    let mut rate = None;
    while pos + 8 <= bytes.len() {
        let id = &bytes[pos..pos + 4];
        let size = u32::from_le_bytes(bytes[pos + 4..pos + 8].try_into().expect("4 bytes")) as usize;
        let body = pos + 8;
        if id == b"fmt " {
            let fmt = bytes.get(body..body + 16).ok_or_else(bad)?;
            let (format, channels, bits) = (u16::from_le_bytes([fmt[0], fmt[1]]), u16::from_le_bytes([fmt[2], fmt[3]]), u16::from_le_bytes([fmt[14], fmt[15]]));
            if format != 1 || channels != 1 || bits != 16 {
                return Err(bad());
            }
            rate = Some(u32::from_le_bytes(fmt[4..8].try_into().expect("4 bytes")));
        } else if id == b"data" {
            let end = if size == 0 || size == u32::MAX as usize { bytes.len() } else { (body + size).min(bytes.len()) };
            let pcm = bytes[body..end].chunks_exact(2).map(|b| i16::from_le_bytes([b[0], b[1]])).collect();
            return Ok((rate.ok_or_else(bad)?, pcm));
        }
        pos = body + size + (size & 1);
    }
    Err(bad())
}

//! Where job outputs live: files under the configured root (`[storage]`),
//! served at `/files/<key>` through signed URLs, the contract's "signed
//! URLs valid for 24 hours": `?expires=<unix s>&sig=<hex HMAC-SHA256 of
//! "<key>\n<expires>">`. An expired or altered URL is a 403.
//!
//! The signing key comes from the config or, when none is set, from
//! `<root>/.signing-key` (created once, mode 0600), so processes sharing
//! the root sign alike and URLs survive a restart.

use std::path::{Path, PathBuf};

use anyhow::Context;
use hmac::{Hmac, KeyInit, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use tokio::io::AsyncWriteExt;

use crate::{Error, Result};

/// `[storage]` in the configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    /// Directory of the outputs.
    pub root: PathBuf,
    /// The base of the URLs handed out (`https://cdn.example.com`); default:
    /// this server's own address.
    pub public_url: Option<String>,
    /// HMAC key of the URLs; default: `<root>/.signing-key`.
    pub signing_key: Option<String>,
    /// How long a URL stays valid (the contract: 24 hours).
    pub url_ttl_secs: u64,
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig { root: PathBuf::from("data/outputs"), public_url: None, signing_key: None, url_ttl_secs: 24 * 3600 }
    }
}

#[derive(Clone)]
pub struct Storage {
    root: PathBuf,
    key: Vec<u8>,
    base: String,
    ttl_secs: u64,
}

impl std::fmt::Debug for Storage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Storage").field("root", &self.root).field("base", &self.base).finish_non_exhaustive()
    }
}

impl Storage {
    /// Opens (creating) the root; `default_base` is used without `public_url`.
    pub fn open(config: &StorageConfig, default_base: &str) -> anyhow::Result<Storage> {
        std::fs::create_dir_all(&config.root).with_context(|| format!("cannot create storage root {}", config.root.display()))?;
        let key = match &config.signing_key {
            Some(k) if k.len() >= 16 => k.as_bytes().to_vec(),
            Some(_) => anyhow::bail!("storage.signing_key must be at least 16 characters"),
            None => load_or_create_key(&config.root.join(".signing-key"))?,
        };
        let base = config.public_url.clone().unwrap_or_else(|| default_base.to_string()).trim_end_matches('/').to_string();
        Ok(Storage { root: config.root.clone(), key, base, ttl_secs: config.url_ttl_secs })
    }

    /// The key of a job's output file `name`.
    pub fn job_key(job_id: &str, name: &str) -> String {
        format!("jobs/{job_id}/{name}")
    }

    /// The file of `key`, refusing anything that could leave the root.
    pub fn path(&self, key: &str) -> Result<PathBuf> {
        let ok = !key.is_empty()
            && key.len() <= 300
            && key.split('/').all(|p| !p.is_empty() && p != "." && p != ".." && !p.starts_with('.'))
            && key.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_./".contains(&b));
        if !ok {
            return Err(Error::not_found("file"));
        }
        Ok(self.root.join(key))
    }

    /// Writes `bytes` as `key` (whole or not at all: a temporary file is
    /// renamed into place).
    pub async fn put(&self, key: &str, bytes: &[u8]) -> Result<()> {
        let mut w = self.writer(key).await?;
        w.write(bytes).await?;
        w.finish().await
    }

    /// A writer for `key`, for outputs streamed from an upstream.
    pub async fn writer(&self, key: &str) -> Result<OutputWriter> {
        let path = self.path(key)?;
        let dir = path.parent().ok_or_else(|| Error::not_found("file"))?;
        tokio::fs::create_dir_all(dir).await.map_err(io)?;
        let tmp = dir.join(format!(".{}.part", uuid::Uuid::new_v4()));
        let file = tokio::fs::File::create(&tmp).await.map_err(io)?;
        Ok(OutputWriter { file, tmp, path, written: 0 })
    }

    /// A URL for `key` valid for the configured time from `now_secs`.
    pub fn signed_url(&self, key: &str, now_secs: i64) -> String {
        let expires = now_secs + self.ttl_secs as i64;
        format!("{}/files/{key}?expires={expires}&sig={}", self.base, hex::encode(self.mac(key, expires).finalize().into_bytes()))
    }

    /// URLs for every key in `keys` (a job's outputs).
    pub fn signed_urls(&self, keys: &[String], now_secs: i64) -> Vec<String> {
        keys.iter().map(|k| self.signed_url(k, now_secs)).collect()
    }

    /// 403 unless `sig` signs `key` until `expires` and that is not past.
    pub fn verify(&self, key: &str, expires: i64, sig: &str, now_secs: i64) -> Result<()> {
        let sig = hex::decode(sig).map_err(|_| forbidden())?;
        // Constant-time comparison.
        self.mac(key, expires).verify_slice(&sig).map_err(|_| forbidden())?;
        if expires < now_secs {
            return Err(Error::Forbidden("this link has expired; request the job again for a fresh one".into()));
        }
        Ok(())
    }

    fn mac(&self, key: &str, expires: i64) -> Hmac<Sha256> {
        self.mac_of(&[key, &expires.to_string()])
    }

    /// An HMAC with the key that signs output URLs over `parts` joined by
    /// newlines. Other signed things (media stream tokens) begin with a part
    /// that names them and have more than two parts; a file key has no
    /// newline, so a signature of one kind never passes for the other.
    pub fn mac_of(&self, parts: &[&str]) -> Hmac<Sha256> {
        let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(&self.key).expect("HMAC takes keys of any length");
        for (i, part) in parts.iter().enumerate() {
            if i > 0 {
                mac.update(b"\n");
            }
            mac.update(part.as_bytes());
        }
        mac
    }
}

/// File extensions of the media types outputs are kept as; the first
/// entry of an extension is the type it is served with.
const MEDIA_TYPES: &[(&str, &str)] = &[
    ("png", "image/png"),
    ("jpg", "image/jpeg"),
    ("webp", "image/webp"),
    ("mp4", "video/mp4"),
    ("webm", "video/webm"),
    ("wav", "audio/wav"),
    ("wav", "audio/x-wav"),
    ("wav", "audio/wave"),
    ("mp3", "audio/mpeg"),
];

/// The extension a file of `content_type` is stored with (`bin` if unknown).
pub fn extension_for(content_type: &str) -> &'static str {
    MEDIA_TYPES.iter().find(|(_, t)| *t == content_type).map_or("bin", |(e, _)| e)
}

/// The type a stored file is served with, from its extension.
pub fn media_type_of(extension: &str) -> &'static str {
    MEDIA_TYPES.iter().find(|(e, _)| *e == extension).map_or("application/octet-stream", |(_, t)| t)
}

fn forbidden() -> Error {
    Error::Forbidden("invalid link signature".into())
}

fn io(e: std::io::Error) -> Error {
    Error::Internal(anyhow::anyhow!("storage: {e}"))
}

/// A file being written; invisible under its key until [`finish`](Self::finish).
pub struct OutputWriter {
    file: tokio::fs::File,
    tmp: PathBuf,
    path: PathBuf,
    written: u64,
}

impl OutputWriter {
    pub async fn write(&mut self, bytes: &[u8]) -> Result<()> {
        self.file.write_all(bytes).await.map_err(io)?;
        self.written += bytes.len() as u64;
        Ok(())
    }

    pub fn written(&self) -> u64 {
        self.written
    }

    pub async fn finish(mut self) -> Result<()> {
        self.file.flush().await.map_err(io)?;
        self.file.sync_all().await.map_err(io)?;
        tokio::fs::rename(&self.tmp, &self.path).await.map_err(io)
    }
}

impl Drop for OutputWriter {
    fn drop(&mut self) {
        // Unfinished: the temporary file goes (after finish it was renamed).
        let _ = std::fs::remove_file(&self.tmp);
    }
}

fn load_or_create_key(path: &Path) -> anyhow::Result<Vec<u8>> {
    if let Ok(k) = std::fs::read(path) {
        if k.len() >= 32 {
            return Ok(k);
        }
    }
    let key: [u8; 32] = rand::random();
    let text = hex::encode(key);
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, &text).with_context(|| format!("cannot write {}", tmp.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
    }
    // Another process may have won the race; its key is the one to use.
    if std::fs::hard_link(&tmp, path).is_err() {
        let _ = std::fs::remove_file(&tmp);
        return std::fs::read(path).with_context(|| format!("cannot read {}", path.display()));
    }
    let _ = std::fs::remove_file(&tmp);
    Ok(text.into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn storage(dir: &Path) -> Storage {
        Storage::open(&StorageConfig { root: dir.into(), ..Default::default() }, "http://127.0.0.1:1").unwrap()
    }

    #[test]
    fn urls_verify_until_they_expire_and_not_when_altered() {
        let dir = tempfile::tempdir().unwrap();
        let s = storage(dir.path());
        let url = url::Url::parse(&s.signed_url("jobs/a/output.png", 1_000)).unwrap();
        assert_eq!(url.path(), "/files/jobs/a/output.png");
        let q: std::collections::HashMap<_, _> = url.query_pairs().into_owned().collect();
        let (exp, sig) = (q["expires"].parse::<i64>().unwrap(), q["sig"].clone());
        assert_eq!(exp, 1_000 + 86_400);
        assert!(s.verify("jobs/a/output.png", exp, &sig, 1_000).is_ok());
        assert!(s.verify("jobs/a/output.png", exp, &sig, exp + 1).is_err(), "expired");
        assert!(s.verify("jobs/b/output.png", exp, &sig, 1_000).is_err(), "other file");
        assert!(s.verify("jobs/a/output.png", exp + 1, &sig, 1_000).is_err(), "longer expiry");
        assert!(s.verify("jobs/a/output.png", exp, "zz", 1_000).is_err(), "not hex");
        // The key persists: a second process signs alike.
        assert_eq!(storage(dir.path()).signed_url("k", 5), s.signed_url("k", 5));
    }

    #[test]
    fn media_types_and_extensions_agree() {
        for ty in ["image/png", "image/jpeg", "video/mp4", "audio/wav", "audio/mpeg"] {
            assert_eq!(media_type_of(extension_for(ty)), ty);
        }
        assert_eq!(extension_for("audio/x-wav"), "wav");
        assert_eq!((extension_for("text/html"), media_type_of("bin")), ("bin", "application/octet-stream"));
    }

    #[test]
    fn keys_cannot_leave_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let s = storage(dir.path());
        for bad in ["", "../x", "jobs/../../etc/passwd", "/etc/passwd", "jobs//x", ".signing-key", "jobs/a/.x.part", "a b"] {
            assert!(s.path(bad).is_err(), "{bad}");
        }
        assert!(s.path("jobs/3f/output.wav").is_ok());
    }

    #[tokio::test]
    async fn an_unfinished_write_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let s = storage(dir.path());
        let mut w = s.writer("jobs/j/out.bin").await.unwrap();
        w.write(b"half").await.unwrap();
        drop(w);
        assert!(!s.path("jobs/j/out.bin").unwrap().exists());
        assert_eq!(std::fs::read_dir(dir.path().join("jobs/j")).unwrap().count(), 0);
        s.put("jobs/j/out.bin", b"whole").await.unwrap();
        assert_eq!(std::fs::read(s.path("jobs/j/out.bin").unwrap()).unwrap(), b"whole");
    }
}

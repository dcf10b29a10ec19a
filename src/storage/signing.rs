//! Signed, expiring output URLs: `/v1/files/{id}?exp=<unix seconds>&sig=<hex HMAC-SHA256(key, "{id}\n{exp}")>`,
//! so a stored output can be shown with `<img src>` without an API key, for a bounded time, and ids cannot be
//! combined with another id's signature. The key comes from config or is generated once into the files directory.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sha2::{Digest, Sha256};

use super::StorageError;

/// SHA-256's block size, as HMAC needs it.
const BLOCK: usize = 64;
/// Where a generated key is kept, inside the files directory (ids can never name it).
const KEY_FILE: &str = ".url-signing-key";

/// Signs and checks output URLs.
#[derive(Clone)]
pub struct UrlSigner {
    /// The HMAC key, already reduced to at most one block.
    key: Vec<u8>,
    ttl: Duration,
}

impl std::fmt::Debug for UrlSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UrlSigner").field("ttl", &self.ttl).finish_non_exhaustive()
    }
}

/// Why a signed URL is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignatureProblem {
    /// `exp` or `sig` is malformed, or the signature is not this gateway's for this id and expiry.
    Invalid,
    /// The signature is right but its time is over.
    Expired { at: u64 },
}

impl UrlSigner {
    pub fn new(secret: &[u8], ttl: Duration) -> Self {
        Self { key: hmac_key(secret), ttl }
    }

    /// The configured secret, or the key generated into `dir` on first use (32 random bytes, hex, mode 0600).
    pub async fn load(secret: Option<&str>, dir: &Path, ttl: Duration) -> Result<Self, StorageError> {
        if let Some(s) = secret {
            return Ok(Self::new(s.as_bytes(), ttl));
        }
        let path = dir.join(KEY_FILE);
        let hex =
            stored_secret(&path, |k| k.len() >= 64, || to_hex(&rand::random::<[u8; 32]>())).await.map_err(|e| {
                StorageError {
                    path: path.display().to_string(),
                    message: format!("cannot store the URL signing key: {e}"),
                }
            })?;
        Ok(Self::new(hex.as_bytes(), ttl))
    }

    /// `?exp=…&sig=…` for `id`, valid for the configured time from now.
    pub fn query(&self, id: &str) -> String {
        let exp = now_secs() + self.ttl.as_secs();
        format!("exp={exp}&sig={}", to_hex(&self.mac(id, exp)))
    }

    /// Checks `exp` and `sig` as they came in the query string.
    pub fn verify(&self, id: &str, exp: &str, sig: &str) -> Result<(), SignatureProblem> {
        let exp: u64 = exp.parse().map_err(|_| SignatureProblem::Invalid)?;
        let given = from_hex(sig).ok_or(SignatureProblem::Invalid)?;
        let expected = self.mac(id, exp);
        if given.len() != expected.len() || given.iter().zip(&expected).fold(0u8, |acc, (a, b)| acc | (a ^ b)) != 0 {
            return Err(SignatureProblem::Invalid);
        }
        if exp < now_secs() {
            return Err(SignatureProblem::Expired { at: exp });
        }
        Ok(())
    }

    /// The signature in a backend's webhook URL for `job` (`/v1/hooks/{backend}/{job}?sig=…`): the MAC of
    /// `"hook\n{backend}\n{job}"`, which no output URL's message can equal (ids never contain a newline). It does
    /// not expire: a backend may retry a delivery for hours, and the job's deadline bounds its use.
    pub fn hook_sig(&self, backend: &str, job: &str) -> String {
        to_hex(&hmac(&self.key, &[b"hook\n", backend.as_bytes(), b"\n", job.as_bytes()]))
    }

    /// Whether `sig` is [`Self::hook_sig`] of `backend` and `job` (compared in constant time).
    pub fn verify_hook(&self, backend: &str, job: &str, sig: &str) -> bool {
        let expected = self.hook_sig(backend, job);
        expected.len() == sig.len() && expected.bytes().zip(sig.bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
    }

    /// The MAC of `"{id}\n{exp}"`.
    fn mac(&self, id: &str, exp: u64) -> [u8; 32] {
        hmac(&self.key, &[id.as_bytes(), b"\n", exp.to_string().as_bytes()])
    }
}

/// An HMAC-SHA256 key from a secret: a secret longer than one block is hashed first (RFC 2104).
pub(crate) fn hmac_key(secret: &[u8]) -> Vec<u8> {
    if secret.len() > BLOCK { Sha256::digest(secret).to_vec() } else { secret.to_vec() }
}

/// The secret kept in the file at `path`, if it is there and `valid`; otherwise `fresh()`, written there first
/// (mode 0600, through a temporary file and a rename, so a crash never leaves half a secret).
pub(crate) async fn stored_secret(
    path: &Path,
    valid: impl Fn(&str) -> bool,
    fresh: impl FnOnce() -> String,
) -> std::io::Result<String> {
    if let Ok(s) = tokio::fs::read_to_string(path).await
        && valid(s.trim())
    {
        return Ok(s.trim().to_owned());
    }
    let secret = fresh();
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    write_private(Path::new(&tmp), secret.as_bytes()).await?;
    tokio::fs::rename(&tmp, path).await?;
    Ok(secret)
}

/// HMAC-SHA256 (RFC 2104) of the concatenated `parts`; `key` comes from [`hmac_key`] (at most one block).
pub(crate) fn hmac(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let mut ipad = [0x36u8; BLOCK];
    let mut opad = [0x5cu8; BLOCK];
    for (i, k) in key.iter().take(BLOCK).enumerate() {
        ipad[i] ^= k;
        opad[i] ^= k;
    }
    let mut inner = Sha256::new().chain_update(ipad);
    for p in parts {
        inner.update(p);
    }
    Sha256::new().chain_update(opad).chain_update(inner.finalize()).finalize().into()
}

fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn from_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || !s.is_ascii() {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok()).collect()
}

#[cfg(unix)]
async fn write_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use tokio::io::AsyncWriteExt;
    let mut f = tokio::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path).await?;
    f.write_all(data).await?;
    f.sync_all().await
}

#[cfg(not(unix))]
async fn write_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    tokio::fs::write(path, data).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmac_matches_rfc_4231_case_2() {
        let mac = hmac(b"Jefe", &[b"what do ya ", b"want for nothing?"]);
        assert_eq!(to_hex(&mac), "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843");
    }

    #[test]
    fn signatures_bind_the_id_and_the_expiry() {
        let s = UrlSigner::new(b"0123456789abcdef0123456789abcdef", Duration::from_secs(60));
        let q = s.query("img_a.png");
        let (exp, sig) = q.strip_prefix("exp=").and_then(|r| r.split_once("&sig=")).unwrap();
        assert_eq!(s.verify("img_a.png", exp, sig), Ok(()));
        assert_eq!(s.verify("img_b.png", exp, sig), Err(SignatureProblem::Invalid), "another id");
        let later = (exp.parse::<u64>().unwrap() + 1).to_string();
        assert_eq!(s.verify("img_a.png", &later, sig), Err(SignatureProblem::Invalid), "a longer life");
        assert_eq!(s.verify("img_a.png", exp, "zz"), Err(SignatureProblem::Invalid));
        let other = UrlSigner::new(b"another key, another gateway.....", Duration::from_secs(60));
        assert_eq!(other.verify("img_a.png", exp, sig), Err(SignatureProblem::Invalid), "another key");
        let old = s.mac("img_a.png", 1000);
        assert_eq!(s.verify("img_a.png", "1000", &to_hex(&old)), Err(SignatureProblem::Expired { at: 1000 }));
    }
}

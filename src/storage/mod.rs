//! Stored outputs: image bytes written under `storage.files` with unguessable ids (`img_<32 hex>.<ext>`), read
//! back by id only. Nothing but ids this module issued can be reached: ids are checked character by character
//! before any path is built.

pub mod signing;

use std::path::{Path, PathBuf};

use bytes::Bytes;

use crate::request::ImageFormat;

/// A storage failure (disk full, permissions): the gateway's fault, not the client's.
#[derive(Debug, thiserror::Error)]
#[error("storage at {path}: {message}")]
pub struct StorageError {
    pub path: String,
    pub message: String,
}

/// Outputs on the local filesystem.
#[derive(Debug, Clone)]
pub struct FileStore {
    root: PathBuf,
}

impl FileStore {
    /// Opens (creating if needed) the directory.
    pub async fn open(root: &Path) -> Result<Self, StorageError> {
        tokio::fs::create_dir_all(root).await.map_err(|e| err(root, format!("cannot create the directory: {e}")))?;
        Ok(Self { root: root.to_path_buf() })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Stores one image and returns its id.
    pub async fn put(&self, bytes: &Bytes, format: ImageFormat) -> Result<String, StorageError> {
        let id = format!("img_{:032x}.{}", rand::random::<u128>(), extension(format));
        let path = self.root.join(&id);
        let tmp = self.root.join(format!(".{id}.tmp"));
        tokio::fs::write(&tmp, bytes).await.map_err(|e| err(&tmp, format!("cannot write an output: {e}")))?;
        tokio::fs::rename(&tmp, &path).await.map_err(|e| err(&path, format!("cannot store an output: {e}")))?;
        Ok(id)
    }

    /// Reads a stored output; `None` when `id` is not one easel issued (or was deleted).
    pub async fn get(&self, id: &str) -> Result<Option<(Bytes, ImageFormat)>, StorageError> {
        let Some(format) = parse_id(id) else { return Ok(None) };
        let path = self.root.join(id);
        match tokio::fs::read(&path).await {
            Ok(data) => Ok(Some((Bytes::from(data), format))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(err(&path, format!("cannot read an output: {e}"))),
        }
    }

    /// Stores a job's output (a video as `vid_<hex>.<ext>`, an image as `img_…`) and returns its id.
    pub async fn put_media(&self, bytes: &Bytes, mime: &str) -> Result<String, StorageError> {
        let (prefix, ext) = match mime {
            "video/mp4" => ("vid", "mp4"),
            "video/webm" => ("vid", "webm"),
            "video/quicktime" => ("vid", "mov"),
            "image/gif" => ("vid", "gif"),
            "image/jpeg" => ("img", "jpg"),
            "image/webp" => ("img", "webp"),
            _ => ("img", "png"),
        };
        let id = format!("{prefix}_{:032x}.{ext}", rand::random::<u128>());
        let path = self.root.join(&id);
        let tmp = self.root.join(format!(".{id}.tmp"));
        tokio::fs::write(&tmp, bytes).await.map_err(|e| err(&tmp, format!("cannot write an output: {e}")))?;
        tokio::fs::rename(&tmp, &path).await.map_err(|e| err(&path, format!("cannot store an output: {e}")))?;
        Ok(id)
    }

    /// Reads a stored output of any kind with its MIME type; `None` for ids easel could not have issued.
    pub async fn get_media(&self, id: &str) -> Result<Option<(Bytes, &'static str)>, StorageError> {
        let Some(mime) = media_mime(id) else { return Ok(None) };
        let path = self.root.join(id);
        match tokio::fs::read(&path).await {
            Ok(data) => Ok(Some((Bytes::from(data), mime))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(err(&path, format!("cannot read an output: {e}"))),
        }
    }

    /// Deletes a stored output (a deleted job's); a missing file is fine.
    pub async fn delete(&self, id: &str) -> Result<(), StorageError> {
        if media_mime(id).is_none() {
            return Ok(());
        }
        let path = self.root.join(id);
        match tokio::fs::remove_file(&path).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(err(&path, format!("cannot delete an output: {e}"))),
        }
    }

    /// Proves the directory is writable (for `/readyz`).
    pub async fn check(&self) -> Result<(), StorageError> {
        let probe = self.root.join(".readyz");
        tokio::fs::write(&probe, b"ok").await.map_err(|e| err(&probe, format!("not writable: {e}")))?;
        tokio::fs::remove_file(&probe).await.map_err(|e| err(&probe, format!("cannot remove the probe file: {e}")))
    }
}

fn extension(format: ImageFormat) -> &'static str {
    match format {
        ImageFormat::Png => "png",
        ImageFormat::Jpeg => "jpg",
        ImageFormat::Webp => "webp",
    }
}

/// The format of a well-formed id, or `None` for anything easel could not have issued.
fn parse_id(id: &str) -> Option<ImageFormat> {
    let rest = id.strip_prefix("img_")?;
    let (hex, ext) = rest.split_once('.')?;
    if hex.len() != 32 || !hex.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()) {
        return None;
    }
    match ext {
        "png" => Some(ImageFormat::Png),
        "jpg" => Some(ImageFormat::Jpeg),
        "webp" => Some(ImageFormat::Webp),
        _ => None,
    }
}

/// The MIME type of a well-formed image or video id, or `None` for anything easel could not have issued.
fn media_mime(id: &str) -> Option<&'static str> {
    if let Some(f) = parse_id(id) {
        return Some(f.mime());
    }
    let rest = id.strip_prefix("vid_")?;
    let (hex, ext) = rest.split_once('.')?;
    if hex.len() != 32 || !hex.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()) {
        return None;
    }
    match ext {
        "mp4" => Some("video/mp4"),
        "webm" => Some("video/webm"),
        "mov" => Some("video/quicktime"),
        "gif" => Some("image/gif"),
        _ => None,
    }
}

fn err(path: &Path, message: String) -> StorageError {
    StorageError { path: path.display().to_string(), message }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_issued_ids_parse() {
        assert_eq!(parse_id("img_0123456789abcdef0123456789abcdef.png"), Some(ImageFormat::Png));
        for bad in [
            "../etc/passwd",
            "img_0123456789abcdef0123456789abcdef.png/..",
            "img_0123456789ABCDEF0123456789abcdef.png",
            "img_123.png",
            "img_0123456789abcdef0123456789abcdef.exe",
            ".readyz",
        ] {
            assert_eq!(parse_id(bad), None, "{bad}");
        }
    }

    #[tokio::test]
    async fn round_trips_and_hides_everything_else() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path()).await.unwrap();
        std::fs::write(dir.path().join("secret.png"), b"x").unwrap();
        let id = store.put(&Bytes::from_static(b"\x89PNG"), ImageFormat::Png).await.unwrap();
        let (bytes, fmt) = store.get(&id).await.unwrap().unwrap();
        assert_eq!((&bytes[..], fmt), (&b"\x89PNG"[..], ImageFormat::Png));
        assert!(store.get("secret.png").await.unwrap().is_none());
        assert!(store.get("img_00000000000000000000000000000000.png").await.unwrap().is_none());
        store.check().await.unwrap();
    }
}

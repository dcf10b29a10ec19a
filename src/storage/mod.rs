//! Stored outputs: image and video bytes with unguessable ids (`img_<32 hex>.<ext>`, `vid_…`), read back by id
//! only, in the local folder `storage.files` (the default) or in an S3-compatible bucket (`storage.files:
//! s3://bucket/prefix`). Nothing but ids this module issued can be reached: ids are checked character by
//! character before any path or object key is built. Reads go through `object_store` for both kinds, so ranged
//! and streamed reads have one implementation.

pub mod retention;
pub mod signing;

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjectPath;
use object_store::signer::Signer;
use object_store::{
    BackoffConfig, ClientOptions, GetOptions, GetRange, GetResultPayload, ObjectStore, ObjectStoreExt, PutPayload,
    RetryConfig,
};
use url::Url;

use crate::config::{S3Config, StorageConfig};
use crate::request::ImageFormat;

/// How long one S3 request may take, body included (large videos stream within it).
const S3_REQUEST_TIMEOUT: Duration = Duration::from_secs(120);
/// How long connecting to S3 may take: an unreachable service fails fast instead of hanging a request.
const S3_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Retries of a failed S3 request, and the time they may take together.
const S3_RETRIES: usize = 2;
const S3_RETRY_TIMEOUT: Duration = Duration::from_secs(10);

/// A storage failure (disk full, permissions, S3 unreachable): the gateway's fault, not the client's.
#[derive(Debug, thiserror::Error)]
#[error("storage at {path}: {message}")]
pub struct StorageError {
    pub path: String,
    pub message: String,
}

/// Stored outputs, in a local folder or an S3-compatible bucket.
#[derive(Debug, Clone)]
pub struct FileStore {
    /// The local folder: the outputs themselves, or (with S3) this instance's own state files.
    root: PathBuf,
    /// Reads, lists and deletes, for both kinds.
    objects: Arc<dyn ObjectStore>,
    kind: Kind,
}

#[derive(Debug, Clone)]
enum Kind {
    /// Writes go to a temporary file renamed into place, so a reader never sees half an output.
    Local,
    S3 {
        s3: Arc<AmazonS3>,
        /// Key prefix, empty or ending in `/`.
        prefix: String,
        /// `s3://bucket/prefix`, for messages.
        label: String,
        /// `Some` = downloads are redirected to presigned URLs valid this long.
        presign: Option<Duration>,
    },
}

/// A stored output opened for sending, whole or in part.
pub enum Opened {
    /// The bytes in `range` of an object of `size` bytes (the whole object when `partial` is false).
    Body {
        stream: BoxStream<'static, Result<Bytes, StorageError>>,
        mime: &'static str,
        range: Range<u64>,
        size: u64,
        partial: bool,
    },
    /// The requested range lies outside an object of `size` bytes.
    Unsatisfiable { size: u64 },
    /// Fetch it from here instead (a presigned URL).
    Redirect(Url),
}

impl FileStore {
    /// Opens (creating if needed) the local directory.
    pub async fn open(root: &Path) -> Result<Self, StorageError> {
        tokio::fs::create_dir_all(root).await.map_err(|e| err(root, format!("cannot create the directory: {e}")))?;
        let objects =
            LocalFileSystem::new_with_prefix(root).map_err(|e| err(root, format!("cannot open the directory: {e}")))?;
        Ok(Self { root: root.to_path_buf(), objects: Arc::new(objects), kind: Kind::Local })
    }

    /// The storage `config` describes: its S3 bucket when set, else the local folder. Contacts no server.
    pub async fn from_config(config: &StorageConfig) -> Result<Self, StorageError> {
        let local = Self::open(&config.files).await?;
        let Some(s3) = &config.s3 else { return Ok(local) };
        let store = Arc::new(s3_store(s3)?);
        let prefix = if s3.prefix.is_empty() { String::new() } else { format!("{}/", s3.prefix) };
        let kind = Kind::S3 {
            s3: Arc::clone(&store),
            label: format!("s3://{}/{prefix}", s3.bucket),
            prefix,
            presign: s3.presign.then_some(s3.presign_ttl),
        };
        Ok(Self { root: local.root, objects: store, kind })
    }

    /// The local folder (outputs, or this instance's state files with S3).
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Stores one image and returns its id.
    pub async fn put(&self, bytes: &Bytes, format: ImageFormat) -> Result<String, StorageError> {
        let id = format!("img_{:032x}.{}", rand::random::<u128>(), extension(format));
        self.write(&id, bytes).await?;
        Ok(id)
    }

    /// Reads a stored output; `None` when `id` is not one easel issued (or was deleted).
    pub async fn get(&self, id: &str) -> Result<Option<(Bytes, ImageFormat)>, StorageError> {
        let Some(format) = parse_id(id) else { return Ok(None) };
        Ok(self.read(id).await?.map(|b| (b, format)))
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
        self.write(&id, bytes).await?;
        Ok(id)
    }

    /// Reads a stored output of any kind with its MIME type; `None` for ids easel could not have issued.
    pub async fn get_media(&self, id: &str) -> Result<Option<(Bytes, &'static str)>, StorageError> {
        let Some(mime) = media_mime(id) else { return Ok(None) };
        Ok(self.read(id).await?.map(|b| (b, mime)))
    }

    /// Opens a stored output for sending: whole, or the bytes an HTTP `Range` header asks for, streamed; or a
    /// presigned URL when S3 downloads are redirected. `None` when `id` is not one easel issued (or is gone).
    pub async fn open_media(&self, id: &str, range: Option<&str>) -> Result<Option<Opened>, StorageError> {
        let Some(mime) = media_mime(id) else { return Ok(None) };
        let location = self.location(id);
        let meta = match self.objects.head(&location).await {
            Ok(m) => m,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(self.fail(id, "cannot read an output", &e)),
        };
        if let Kind::S3 { s3, presign: Some(ttl), .. } = &self.kind {
            let url = s3
                .signed_url(object_store::signer::Method::GET, &location, *ttl)
                .await
                .map_err(|e| self.fail(id, "cannot presign a download", &e))?;
            return Ok(Some(Opened::Redirect(url)));
        }
        let size = meta.size;
        let (wanted, partial) = match range.map(|r| parse_range(r, size)) {
            None | Some(RangeAsk::Ignore) => (0..size, false),
            Some(RangeAsk::Bytes(r)) => (r, true),
            Some(RangeAsk::Unsatisfiable) => return Ok(Some(Opened::Unsatisfiable { size })),
        };
        let options = GetOptions { range: partial.then(|| GetRange::Bounded(wanted.clone())), ..GetOptions::default() };
        let got = match self.objects.get_opts(&location, options).await {
            Ok(g) => g,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(self.fail(id, "cannot read an output", &e)),
        };
        let label = self.label(id);
        let stream = match got.payload {
            // object_store reads a local file 8 KiB per blocking task; large reads go far faster.
            GetResultPayload::File(file, _) => file_chunks(file, got.range, label),
            GetResultPayload::Stream(stream) => stream
                .map(move |chunk| {
                    chunk.map_err(|e| StorageError {
                        path: label.clone(),
                        message: format!("cannot read an output: {e}"),
                    })
                })
                .boxed(),
        };
        Ok(Some(Opened::Body { stream, mime, range: wanted, size, partial }))
    }

    /// Deletes a stored output (a deleted job's); a missing file is fine.
    pub async fn delete(&self, id: &str) -> Result<(), StorageError> {
        if media_mime(id).is_none() {
            return Ok(());
        }
        if let Kind::Local = self.kind {
            let path = self.root.join(id);
            return match tokio::fs::remove_file(&path).await {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(err(&path, format!("cannot delete an output: {e}"))),
            };
        }
        match self.objects.delete(&self.location(id)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.fail(id, "cannot delete an output", &e)),
        }
    }

    /// Deletes every output easel issued that was last written before `cutoff`; returns how many.
    pub async fn delete_older_than(&self, cutoff: SystemTime) -> Result<u64, StorageError> {
        let prefix = match &self.kind {
            Kind::Local => None,
            Kind::S3 { prefix, .. } => Some(ObjectPath::from(prefix.as_str())),
        };
        let mut listing = self.objects.list(prefix.as_ref());
        let mut deleted = 0;
        while let Some(item) = listing.next().await {
            let meta = item.map_err(|e| self.fail("", "cannot list outputs", &e))?;
            let Some(id) = meta.location.filename() else { continue };
            // Only direct children the store issued: never state files, temporaries or other keys.
            if media_mime(id).is_none() || self.location(id) != meta.location {
                continue;
            }
            if SystemTime::from(meta.last_modified) < cutoff {
                self.delete(id).await?;
                deleted += 1;
            }
        }
        Ok(deleted)
    }

    /// Proves the storage is writable (for `/readyz`).
    pub async fn check(&self) -> Result<(), StorageError> {
        if let Kind::Local = self.kind {
            let probe = self.root.join(".readyz");
            tokio::fs::write(&probe, b"ok").await.map_err(|e| err(&probe, format!("not writable: {e}")))?;
            return tokio::fs::remove_file(&probe)
                .await
                .map_err(|e| err(&probe, format!("cannot remove the probe file: {e}")));
        }
        let probe = self.location(".readyz");
        self.objects
            .put(&probe, PutPayload::from_static(b"ok"))
            .await
            .map_err(|e| self.fail(".readyz", "not writable", &e))?;
        self.objects.delete(&probe).await.map_err(|e| self.fail(".readyz", "cannot remove the probe object", &e))
    }

    /// Writes an output under its (already issued) id.
    async fn write(&self, id: &str, bytes: &Bytes) -> Result<(), StorageError> {
        if let Kind::Local = self.kind {
            let path = self.root.join(id);
            let tmp = self.root.join(format!(".{id}.tmp"));
            tokio::fs::write(&tmp, bytes).await.map_err(|e| err(&tmp, format!("cannot write an output: {e}")))?;
            return tokio::fs::rename(&tmp, &path)
                .await
                .map_err(|e| err(&path, format!("cannot store an output: {e}")));
        }
        // One PUT: S3 makes an object visible only once it is complete.
        self.objects
            .put(&self.location(id), PutPayload::from_bytes(bytes.clone()))
            .await
            .map(|_| ())
            .map_err(|e| self.fail(id, "cannot store an output", &e))
    }

    /// The whole of an output; `None` when it does not exist.
    async fn read(&self, id: &str) -> Result<Option<Bytes>, StorageError> {
        if let Kind::Local = self.kind {
            let path = self.root.join(id);
            return match tokio::fs::read(&path).await {
                Ok(data) => Ok(Some(Bytes::from(data))),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(err(&path, format!("cannot read an output: {e}"))),
            };
        }
        let got = match self.objects.get(&self.location(id)).await {
            Ok(g) => g,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(self.fail(id, "cannot read an output", &e)),
        };
        got.bytes().await.map(Some).map_err(|e| self.fail(id, "cannot read an output", &e))
    }

    /// Where an id lives in `objects`. Callers pass only checked ids (or the fixed probe name).
    fn location(&self, id: &str) -> ObjectPath {
        match &self.kind {
            Kind::Local => ObjectPath::from(id),
            Kind::S3 { prefix, .. } => ObjectPath::from(format!("{prefix}{id}")),
        }
    }

    fn label(&self, id: &str) -> String {
        match &self.kind {
            Kind::Local => self.root.join(id).display().to_string(),
            Kind::S3 { label, .. } => format!("{label}{id}"),
        }
    }

    fn fail(&self, id: &str, what: &str, e: &object_store::Error) -> StorageError {
        let kind = if matches!(self.kind, Kind::S3 { .. }) { "S3-compatible storage: " } else { "" };
        StorageError { path: self.label(id), message: format!("{kind}{what}: {e}") }
    }
}

/// How much of a local file one blocking read takes: large enough that a 100 MB video costs a few hundred reads,
/// small enough that a slow client holds little (the socket's pace pulls the next read).
const FILE_CHUNK: u64 = 512 * 1024;

/// The bytes `range` of an open local file, `FILE_CHUNK` at a time, each read on the blocking pool.
fn file_chunks(
    file: std::fs::File,
    range: Range<u64>,
    label: String,
) -> BoxStream<'static, Result<Bytes, StorageError>> {
    let start = (file, range.start, label);
    futures_util::stream::try_unfold(start, move |(file, at, label)| async move {
        if at >= range.end {
            return Ok(None);
        }
        let want = (range.end - at).min(FILE_CHUNK) as usize;
        let read = tokio::task::spawn_blocking(move || {
            use std::io::{Read, Seek, SeekFrom};
            let mut file = file;
            file.seek(SeekFrom::Start(at))?;
            let mut buf = Vec::with_capacity(want);
            (&mut file).take(want as u64).read_to_end(&mut buf)?;
            Ok::<_, std::io::Error>((buf, file))
        })
        .await;
        let fail = |message: String| StorageError { path: label.clone(), message };
        match read {
            Ok(Ok((buf, _))) if buf.is_empty() => Err(fail("cannot read an output: it ended early".into())),
            Ok(Ok((buf, file))) => {
                let next = at + buf.len() as u64;
                Ok(Some((Bytes::from(buf), (file, next, label))))
            }
            Ok(Err(e)) => Err(fail(format!("cannot read an output: {e}"))),
            Err(e) => Err(fail(format!("cannot read an output: the read task failed: {e}"))),
        }
    })
    .boxed()
}

/// The S3 client for `config`, with short timeouts and few retries so an unreachable service fails fast.
fn s3_store(config: &S3Config) -> Result<AmazonS3, StorageError> {
    let mut builder = AmazonS3Builder::new()
        .with_bucket_name(&config.bucket)
        .with_region(&config.region)
        .with_virtual_hosted_style_request(!config.path_style)
        .with_allow_http(config.allow_http)
        .with_client_options(
            ClientOptions::new()
                .with_allow_http(config.allow_http)
                .with_timeout(S3_REQUEST_TIMEOUT)
                .with_connect_timeout(S3_CONNECT_TIMEOUT),
        )
        .with_retry(RetryConfig {
            backoff: BackoffConfig::default(),
            max_retries: S3_RETRIES,
            retry_timeout: S3_RETRY_TIMEOUT,
        });
    if let Some(endpoint) = &config.endpoint {
        builder = builder.with_endpoint(endpoint.as_str().trim_end_matches('/'));
    }
    if let (Some(id), Some(secret)) = (&config.access_key_id, &config.secret_access_key) {
        builder = builder.with_access_key_id(id.expose()).with_secret_access_key(secret.expose());
    }
    builder.build().map_err(|e| StorageError {
        path: format!("s3://{}/{}", config.bucket, config.prefix),
        message: format!("cannot set up the S3 client: {e}"),
    })
}

/// What an HTTP `Range` header asks of an object of a given size.
#[derive(Debug, PartialEq, Eq)]
enum RangeAsk {
    /// One satisfiable range (end exclusive).
    Bytes(Range<u64>),
    /// Nothing in the object matches: 416.
    Unsatisfiable,
    /// Not a single bytes range this server understands: send the whole object, as RFC 9110 allows.
    Ignore,
}

/// Parses `bytes=a-b`, `bytes=a-` and `bytes=-n` (one range only) against `size`.
fn parse_range(header: &str, size: u64) -> RangeAsk {
    let Some(spec) = header.trim().strip_prefix("bytes=") else { return RangeAsk::Ignore };
    if spec.contains(',') {
        return RangeAsk::Ignore;
    }
    let Some((a, b)) = spec.trim().split_once('-') else { return RangeAsk::Ignore };
    let (a, b) = (a.trim(), b.trim());
    let num = |s: &str| if s.bytes().all(|c| c.is_ascii_digit()) { s.parse::<u64>().ok() } else { None };
    match (a.is_empty(), b.is_empty()) {
        (true, true) => RangeAsk::Ignore,
        (true, false) => match num(b) {
            None => RangeAsk::Ignore,
            Some(0) => RangeAsk::Unsatisfiable,
            Some(_) if size == 0 => RangeAsk::Unsatisfiable,
            Some(n) => RangeAsk::Bytes(size.saturating_sub(n)..size),
        },
        (false, _) => {
            let Some(start) = num(a) else { return RangeAsk::Ignore };
            let end = if b.is_empty() { Some(u64::MAX) } else { num(b) };
            match end {
                None => RangeAsk::Ignore,
                Some(end) if end < start => RangeAsk::Ignore,
                Some(_) if start >= size => RangeAsk::Unsatisfiable,
                Some(end) => RangeAsk::Bytes(start..end.saturating_add(1).min(size)),
            }
        }
    }
}

fn extension(format: ImageFormat) -> &'static str {
    match format {
        ImageFormat::Png => "png",
        ImageFormat::Jpeg => "jpg",
        ImageFormat::Webp => "webp",
    }
}

/// Whether `id` is a well-formed image id (what `/v1/files/{id}` serves).
pub fn is_image_id(id: &str) -> bool {
    parse_id(id).is_some()
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

/// The MIME type of an id easel issued (image or video), or `None` for anything else.
pub fn mime_of(id: &str) -> Option<&'static str> {
    media_mime(id)
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

    #[test]
    fn ranges_follow_rfc_9110() {
        assert_eq!(parse_range("bytes=0-9", 100), RangeAsk::Bytes(0..10));
        assert_eq!(parse_range("bytes=90-200", 100), RangeAsk::Bytes(90..100));
        assert_eq!(parse_range("bytes=50-", 100), RangeAsk::Bytes(50..100));
        assert_eq!(parse_range("bytes=-10", 100), RangeAsk::Bytes(90..100));
        assert_eq!(parse_range("bytes=-500", 100), RangeAsk::Bytes(0..100));
        assert_eq!(parse_range("bytes=100-", 100), RangeAsk::Unsatisfiable);
        assert_eq!(parse_range("bytes=-0", 100), RangeAsk::Unsatisfiable);
        assert_eq!(parse_range("bytes=0-0", 0), RangeAsk::Unsatisfiable);
        for ignored in ["items=0-1", "bytes=0-1,5-6", "bytes=5-1", "bytes=x-", "bytes=-", "bytes=+1-2"] {
            assert_eq!(parse_range(ignored, 100), RangeAsk::Ignore, "{ignored}");
        }
    }

    #[tokio::test]
    async fn local_ranges_stream_and_old_outputs_expire() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path()).await.unwrap();
        let id = store.put_media(&Bytes::from_static(b"0123456789"), "video/mp4").await.unwrap();
        let Some(Opened::Body { stream, range, size, partial, .. }) =
            store.open_media(&id, Some("bytes=2-4")).await.unwrap()
        else {
            panic!("no body");
        };
        let got: Vec<Bytes> = stream.map(|c| c.unwrap()).collect().await;
        assert_eq!((got.concat(), range, size, partial), (b"234".to_vec(), 2..5, 10, true));
        assert!(matches!(
            store.open_media(&id, Some("bytes=10-")).await.unwrap(),
            Some(Opened::Unsatisfiable { size: 10 })
        ));
        assert!(store.open_media("secret.png", None).await.unwrap().is_none());
        std::fs::write(dir.path().join("notes.txt"), b"keep").unwrap();
        assert_eq!(store.delete_older_than(SystemTime::now() - Duration::from_secs(3600)).await.unwrap(), 0);
        assert_eq!(store.delete_older_than(SystemTime::now() + Duration::from_secs(1)).await.unwrap(), 1);
        assert!(store.get_media(&id).await.unwrap().is_none());
        assert!(dir.path().join("notes.txt").exists());
    }

    #[tokio::test]
    async fn large_local_files_stream_in_big_reads_whole_or_in_part() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path()).await.unwrap();
        let data: Vec<u8> = (0..(FILE_CHUNK * 2 + 1000)).map(|i| (i % 251) as u8).collect();
        let id = store.put_media(&Bytes::from(data.clone()), "video/mp4").await.unwrap();
        for (ask, want) in [(None, 0..data.len()), (Some("bytes=100-1048999"), 100..1_049_000)] {
            let Some(Opened::Body { stream, .. }) = store.open_media(&id, ask).await.unwrap() else {
                panic!("no body")
            };
            let got: Vec<Bytes> = stream.map(|c| c.unwrap()).collect().await;
            assert!(got.iter().all(|c| c.len() as u64 <= FILE_CHUNK), "reads of at most FILE_CHUNK");
            assert_eq!(got.len(), want.len().div_ceil(FILE_CHUNK as usize), "{ask:?}: as few reads as that allows");
            assert_eq!(got.concat(), data[want].to_vec(), "{ask:?}");
        }
    }
}

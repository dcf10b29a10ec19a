//! Request body extractors whose every rejection is an OpenAI-shaped [`ApiError`]. One body, three encodings:
//! JSON is parsed as is; multipart and form-urlencoded fields are turned into the same JSON object (typed by
//! field) and parsed by the same code, so all three mean exactly the same thing.

use axum::extract::{FromRequest, Multipart, Request};
use axum::http::header::CONTENT_TYPE;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use super::error::ApiError;
use crate::api::images::{FieldType, ImagesRequest, field_type};
use crate::backends::InputImage;
use crate::error::Error;
use crate::pipeline::images::ImageSource;
use crate::request::RequestError;
use crate::state::AppState;

/// A body for the image routes, from JSON, multipart or form fields.
#[derive(Debug)]
pub struct ImageBody<T>(pub T);

impl<T: DeserializeOwned> FromRequest<AppState> for ImageBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        let (limit, mime) = limits(&req, state)?;
        let object = match mime.as_str() {
            "application/json" | "" => {
                return parse_json(&json_body(req, limit).await?).map(ImageBody);
            }
            "application/x-www-form-urlencoded" => {
                let bytes = read_body(req, limit).await?;
                let mut fields = Map::new();
                for (k, v) in url::form_urlencoded::parse(&bytes) {
                    insert_field(&mut fields, &k, &v)?;
                }
                fields
            }
            // Boxed: multipart's futures would otherwise make every JSON request's extraction 3 KB.
            "multipart/form-data" => Box::pin(text_fields(req, state, limit)).await?,
            other => return Err(Error::UnsupportedMediaType(other.to_owned()).into()),
        };
        from_value(Value::Object(object)).map(ImageBody)
    }
}

/// The text fields of a multipart body (a file among them is refused).
async fn text_fields(req: Request, state: &AppState, limit: usize) -> Result<Map<String, Value>, ApiError> {
    let mut multipart = Multipart::from_request(req, state).await.map_err(multipart_rejection)?;
    let mut fields = Map::new();
    while let Some(field) = multipart.next_field().await.map_err(|e| multipart_error(e, limit))? {
        let name = field.name().unwrap_or("").to_owned();
        if field.file_name().is_some() {
            return Err(RequestError::param(
                &name,
                format!("`{name}` is a file; this endpoint takes only text fields"),
            )
            .into());
        }
        let text = field.text().await.map_err(|e| multipart_error(e, limit))?;
        insert_field(&mut fields, &name, &text)?;
    }
    Ok(fields)
}

/// The body limit (`server.max_body_bytes`) and the request's media type; refuses a declared length over the
/// limit at once.
fn limits(req: &Request, state: &AppState) -> Result<(usize, String), ApiError> {
    let limit = state.config.server.max_body_bytes;
    let content_type = req.headers().get(CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    let mime = content_type.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    let declared = req
        .headers()
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|len| len > limit) {
        return Err(Error::PayloadTooLarge { limit }.into());
    }
    Ok((limit, mime))
}

/// A JSON body, refused when empty (a client that forgot to send it).
async fn json_body(req: Request, limit: usize) -> Result<axum::body::Bytes, ApiError> {
    let bytes = read_body(req, limit).await?;
    if bytes.is_empty() {
        return Err(
            RequestError::new("the request body is empty; send a JSON object such as {\"prompt\": \"...\"}").into()
        );
    }
    Ok(bytes)
}

async fn read_body(req: Request, limit: usize) -> Result<axum::body::Bytes, ApiError> {
    axum::body::to_bytes(req.into_body(), limit).await.map_err(|e| {
        let too_large = std::iter::successors(Some(&e as &dyn std::error::Error), |e| e.source())
            .any(|e| e.is::<http_body_util::LengthLimitError>());
        if too_large {
            Error::PayloadTooLarge { limit }.into()
        } else {
            Error::Request(RequestError::new(format!("could not read the request body: {e}"))).into()
        }
    })
}

fn multipart_error(e: axum::extract::multipart::MultipartError, limit: usize) -> ApiError {
    if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
        return Error::PayloadTooLarge { limit }.into();
    }
    RequestError::new(format!("malformed multipart body: {}", e.body_text())).into()
}

fn multipart_rejection(e: axum::extract::multipart::MultipartRejection) -> ApiError {
    RequestError::new(format!("malformed multipart body: {}", e.body_text())).into()
}

/// A list's `limit` query parameter: 1 to 100 (OpenAI's range).
pub fn list_limit(v: &str) -> Result<u32, RequestError> {
    v.parse()
        .ok()
        .filter(|l| (1..=100).contains(l))
        .ok_or_else(|| RequestError::param("limit", format!("`limit` must be a whole number from 1 to 100, not `{v}`")))
}

/// Parses a JSON body into `T`, naming the position of a syntax error and the field of a type error.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    match serde_path_to_error::deserialize(&mut de) {
        Ok(v) => {
            de.end().map_err(|e| RequestError::new(format!("malformed JSON body: {e}")))?;
            Ok(v)
        }
        Err(e) => {
            let path = e.path().to_string();
            let inner = e.into_inner();
            if inner.is_syntax() || inner.is_eof() {
                return Err(RequestError::new(format!("malformed JSON body: {inner}")).into());
            }
            Err(field_error(&path, &strip_position(&inner.to_string())).into())
        }
    }
}

fn from_value<T: DeserializeOwned>(v: Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(v).map_err(|e| {
        let path = e.path().to_string();
        field_error(&path, &e.into_inner().to_string()).into()
    })
}

/// A type or unknown-field error, with `param` set to the field.
fn field_error(path: &str, message: &str) -> RequestError {
    if let Some(rest) = message.strip_prefix("unknown field `") {
        let name = rest.split('`').next().unwrap_or("");
        if let Some(use_instead) = near_miss(name) {
            return RequestError::param(name, format!("unknown field `{name}`: this API calls it {use_instead}"))
                .with_code("unknown_parameter");
        }
        return RequestError::param(name, format!("unknown field `{name}`: this API has no such parameter (to pass a backend-specific option, put it in `extra`)"))
            .with_code("unknown_parameter");
    }
    if path.is_empty() || path == "." {
        return RequestError::new(format!("invalid request body: {message}"));
    }
    RequestError::param(path, format!("invalid `{path}`: {message}"))
}

/// Names other APIs (fal, Replicate, diffusers, A1111) use for a field OpenAI's has under another name.
fn near_miss(name: &str) -> Option<&'static str> {
    Some(match name {
        "model_id" | "model_name" => "`model`",
        "num_images" | "num_outputs" | "batch_size" | "count" => "`n`",
        "image_size" | "resolution" | "width" | "height" | "aspect_ratio" => {
            "`size` (\"WIDTHxHEIGHT\", e.g. \"1024x768\")"
        }
        "negative" | "neg_prompt" => "`negative_prompt`",
        "cfg_scale" | "cfg" | "guidance" => "`guidance_scale`",
        "num_inference_steps" | "num_steps" => "`steps`",
        "format" | "image_format" => "`output_format`",
        "responseformat" | "format_response" => "`response_format`",
        _ => return None,
    })
}

fn strip_position(s: &str) -> String {
    match s.find(" at line ") {
        Some(i) => s[..i].to_owned(),
        None => s.to_owned(),
    }
}

/// Adds one text field to the object, typed as the JSON body would carry it.
fn insert_field(fields: &mut Map<String, Value>, name: &str, text: &str) -> Result<(), ApiError> {
    insert_typed_field(fields, name, text, field_type)
}

/// The JSON type of each `POST /v1/videos` field sent as multipart text (`seconds` stays a string, as OpenAI's).
fn video_field_type(name: &str) -> Option<FieldType> {
    match name {
        "model" | "prompt" | "seconds" | "size" | "negative_prompt" | "webhook_url" => Some(FieldType::Text),
        "seed" => Some(FieldType::Integer),
        "extra" => Some(FieldType::Object),
        _ => None,
    }
}

/// Adds one text field (multipart or form) as the JSON value its name's type says.
fn insert_typed_field(
    fields: &mut Map<String, Value>,
    name: &str,
    text: &str,
    field_type: fn(&str) -> Option<FieldType>,
) -> Result<(), ApiError> {
    let Some(kind) = field_type(name) else {
        return Err(field_error("", &format!("unknown field `{name}`")).into());
    };
    if fields.contains_key(name) {
        return Err(RequestError::param(name, format!("`{name}` is given more than once")).into());
    }
    let bad = |what: &str| -> ApiError {
        RequestError::param(name, format!("invalid `{name}`: `{text}` is not {what}")).into()
    };
    let value = match kind {
        FieldType::Text => Value::String(text.to_owned()),
        FieldType::Integer => text.trim().parse::<u64>().map(Value::from).map_err(|_| bad("a non-negative integer"))?,
        FieldType::Number => {
            let n = text.trim().parse::<f64>().map_err(|_| bad("a number"))?;
            serde_json::Number::from_f64(n).map(Value::Number).ok_or_else(|| bad("a finite number"))?
        }
        FieldType::Boolean => match text.trim() {
            "true" | "1" => Value::Bool(true),
            "false" | "0" => Value::Bool(false),
            _ => return Err(bad("true or false")),
        },
        FieldType::Object => match serde_json::from_str::<Value>(text) {
            Ok(v @ Value::Object(_)) => v,
            _ => return Err(bad("a JSON object")),
        },
    };
    fields.insert(name.to_owned(), value);
    Ok(())
}

/// A body for `/v1/images/edits`: the generation fields plus input images, from multipart (`image`, `image[]`,
/// `mask` files) or JSON (`images: [{image_url | file_id}]`, `mask: {...}` with data URLs or easel file ids).
#[derive(Debug)]
pub struct EditBody {
    pub fields: ImagesRequest,
    pub images: Vec<ImageSource>,
    pub mask: Option<ImageSource>,
}

impl FromRequest<AppState> for EditBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        // Boxed: the extraction (3 KB, multipart's futures) is freed once read, not kept in the handler's future
        // while the request waits for a backend.
        Box::pin(Self::read(req, state)).await
    }
}

impl EditBody {
    async fn read(req: Request, state: &AppState) -> Result<Self, ApiError> {
        let (limit, mime) = limits(&req, state)?;
        match mime.as_str() {
            "multipart/form-data" => {
                let mut multipart = Multipart::from_request(req, state).await.map_err(multipart_rejection)?;
                let (mut fields, mut images, mut mask) = (Map::new(), Vec::new(), None);
                while let Some(mut field) = multipart.next_field().await.map_err(|e| multipart_error(e, limit))? {
                    let name = field.name().unwrap_or("").to_owned();
                    match name.as_str() {
                        "image" | "image[]" | "mask" => {
                            let param = if name == "mask" { "mask" } else { "image" };
                            let index = if param == "mask" { 0 } else { images.len() };
                            let img = file_part(&mut field, param, index, limit).await?;
                            if param == "mask" {
                                if mask.is_some() {
                                    return Err(RequestError::param("mask", "`mask` is given more than once").into());
                                }
                                mask = Some(ImageSource::Inline(img));
                            } else {
                                images.push(ImageSource::Inline(img));
                            }
                        }
                        "input_fidelity" => {
                            let v = field.text().await.map_err(|e| multipart_error(e, limit))?;
                            check_fidelity(&v)?;
                        }
                        _ => {
                            if field.file_name().is_some() {
                                return Err(RequestError::param(
                                    &name,
                                    format!("`{name}` is a file; files go in `image`, `image[]` or `mask`"),
                                )
                                .into());
                            }
                            let text = field.text().await.map_err(|e| multipart_error(e, limit))?;
                            insert_field(&mut fields, &name, &text)?;
                        }
                    }
                }
                Ok(Self { fields: from_value(Value::Object(fields))?, images, mask })
            }
            "application/json" | "" => {
                let bytes = read_body(req, limit).await?;
                let mut object: Map<String, Value> = parse_json(&bytes)?;
                let mut images = Vec::new();
                match object.remove("images") {
                    Some(Value::Array(items)) => {
                        for (i, item) in items.into_iter().enumerate() {
                            images.push(image_ref(item, "images", i)?);
                        }
                    }
                    Some(_) => {
                        return Err(RequestError::param(
                            "images",
                            "`images` must be a list of {\"image_url\": ...} or {\"file_id\": ...}",
                        )
                        .into());
                    }
                    None => {}
                }
                if let Some(single) = object.remove("image") {
                    images.push(image_ref(single, "image", images.len())?);
                }
                let mask = object.remove("mask").map(|m| image_ref(m, "mask", 0)).transpose()?;
                if let Some(v) = object.remove("input_fidelity") {
                    check_fidelity(v.as_str().unwrap_or(""))?;
                }
                Ok(Self { fields: from_value(Value::Object(object))?, images, mask })
            }
            other => Err(Error::UnsupportedMediaType(other.to_owned()).into()),
        }
    }
}

/// Reads one multipart file part (bounded by the route's limit) as an input image for `param`.
async fn file_part(
    field: &mut axum::extract::multipart::Field<'_>,
    param: &'static str,
    index: usize,
    limit: usize,
) -> Result<InputImage, ApiError> {
    let file_name = field.file_name().map(str::to_owned);
    let mut buf = bytes::BytesMut::new();
    while let Some(chunk) = field.chunk().await.map_err(|e| multipart_error(e, limit))? {
        buf.extend_from_slice(&chunk);
    }
    input_image(buf.freeze(), param, index, file_name)
}

fn check_fidelity(v: &str) -> Result<(), ApiError> {
    match v {
        "high" | "low" => Ok(()),
        _ => {
            Err(RequestError::param("input_fidelity", format!("`input_fidelity` must be high or low, not `{v}`"))
                .into())
        }
    }
}

fn input_image(
    bytes: bytes::Bytes,
    param: &'static str,
    index: usize,
    file_name: Option<String>,
) -> Result<InputImage, ApiError> {
    if bytes.is_empty() {
        return Err(RequestError::param(param, format!("`{param}` is empty")).into());
    }
    let Some(format) = crate::media::sniff(&bytes) else {
        return Err(RequestError::param(param, format!("`{param}` is not a PNG, JPEG or WebP image")).into());
    };
    if let Err(crate::media::DecodeError::TooLarge(m)) = crate::media::check(&bytes) {
        return Err(RequestError::param(param, format!("`{param}`: {m}")).with_code("image_too_large").into());
    }
    let name = file_name
        .filter(|n| !n.is_empty() && n.len() < 200)
        .unwrap_or_else(|| format!("{param}-{index}.{}", format.as_str()));
    Ok(InputImage { bytes, format, name })
}

/// `{"image_url": "data:..."}`, `{"file_id": "img_..."}` or a bare data-URL string.
fn image_ref(v: Value, param: &'static str, index: usize) -> Result<ImageSource, ApiError> {
    let (url, file_id) = match &v {
        Value::String(s) => (Some(s.as_str()), None),
        Value::Object(o) => (o.get("image_url").and_then(Value::as_str), o.get("file_id").and_then(Value::as_str)),
        _ => (None, None),
    };
    match (url, file_id) {
        (Some(u), None) if u.starts_with("data:") => {
            let bytes = crate::media::decode_base64(u).map_err(|e| ApiError::from(RequestError::param(param, format!("`{param}`: {e}"))))?;
            Ok(ImageSource::Inline(input_image(bytes, param, index, None)?))
        }
        (Some(u), None) if u.starts_with("http://") || u.starts_with("https://") => Err(RequestError::param(
            param,
            format!("`{param}`: easel does not fetch image URLs; send a data URL (data:image/png;base64,...) or the `file_id` of an output"),
        )
        .into()),
        (None, Some(id)) => Ok(ImageSource::Stored { id: id.to_owned(), param }),
        _ => Err(RequestError::param(param, format!("`{param}` must be {{\"image_url\": \"data:...\"}} or {{\"file_id\": \"...\"}}")).into()),
    }
}

/// A body for `POST /v1/videos`: the fields plus an optional `input_reference` image, from multipart (a file part
/// named `input_reference`) or JSON (`input_reference: {"image_url": "data:…"}` or `{"file_id": "img_…"}`).
#[derive(Debug)]
pub struct VideoBody {
    pub fields: crate::api::videos::VideosRequest,
    pub reference: Option<ImageSource>,
}

impl FromRequest<AppState> for VideoBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        // Boxed: the extraction (3 KB, multipart's futures) is freed once read, not kept in the handler's future
        // while the request waits for a backend.
        Box::pin(Self::read(req, state)).await
    }
}

impl VideoBody {
    async fn read(req: Request, state: &AppState) -> Result<Self, ApiError> {
        let (limit, mime) = limits(&req, state)?;
        match mime.as_str() {
            "multipart/form-data" => {
                let mut multipart = Multipart::from_request(req, state).await.map_err(multipart_rejection)?;
                let (mut fields, mut reference) = (Map::new(), None);
                while let Some(mut field) = multipart.next_field().await.map_err(|e| multipart_error(e, limit))? {
                    let name = field.name().unwrap_or("").to_owned();
                    if name == "input_reference" {
                        if reference.is_some() {
                            return Err(RequestError::param(
                                "input_reference",
                                "`input_reference` is given more than once",
                            )
                            .into());
                        }
                        let img = file_part(&mut field, "input_reference", 0, limit).await?;
                        reference = Some(ImageSource::Inline(img));
                    } else if field.file_name().is_some() {
                        return Err(RequestError::param(
                            &name,
                            format!("`{name}` is a file; the file goes in `input_reference`"),
                        )
                        .into());
                    } else {
                        let text = field.text().await.map_err(|e| multipart_error(e, limit))?;
                        insert_typed_field(&mut fields, &name, &text, video_field_type)?;
                    }
                }
                Ok(Self { fields: from_value(Value::Object(fields))?, reference })
            }
            "application/json" | "" => {
                let bytes = json_body(req, limit).await?;
                let mut object: Map<String, Value> = parse_json(&bytes)?;
                let reference =
                    object.remove("input_reference").map(|r| image_ref(r, "input_reference", 0)).transpose()?;
                Ok(Self { fields: from_value(Value::Object(object))?, reference })
            }
            other => Err(Error::UnsupportedMediaType(other.to_owned()).into()),
        }
    }
}

//! A validated video request (`POST /v1/videos`): OpenAI's fields (`model`, `prompt`, `seconds` as a string,
//! `size`, `input_reference`) plus easel's extensions (`negative_prompt`, `seed`, `extra`).

use serde_json::{Map, Value};

use super::{ImageFormat, RequestError, Size};

/// A reference image (first frame or style reference), as sent.
#[derive(Debug, Clone)]
pub struct ReferenceImage {
    pub bytes: bytes::Bytes,
    pub format: ImageFormat,
}

/// Everything a video backend needs, already checked.
#[derive(Debug, Clone)]
pub struct GenerateVideo {
    /// `None` = the first video model in the configuration.
    pub model: Option<String>,
    pub prompt: String,
    /// Clip length in whole seconds (OpenAI sends `"4"`, `"8"`, `"12"`; easel accepts 1–60).
    pub seconds: u32,
    /// `None` = the model's default size.
    pub size: Option<Size>,
    pub reference: Option<ReferenceImage>,
    pub negative_prompt: Option<String>,
    pub seed: Option<u64>,
    pub extra: Option<Map<String, Value>>,
}

/// Longest clip easel asks any backend for.
pub const MAX_SECONDS: u32 = 60;

impl GenerateVideo {
    /// Parses `seconds` as OpenAI sends it (a string) or as a number; default 4.
    pub fn parse_seconds(v: Option<&Value>) -> Result<u32, RequestError> {
        let bad = || {
            RequestError::param(
                "seconds",
                format!("`seconds` must be a whole number of seconds from 1 to {MAX_SECONDS}, e.g. \"8\""),
            )
        };
        let n = match v {
            None | Some(Value::Null) => return Ok(4),
            Some(Value::String(s)) => s.trim().parse::<u32>().map_err(|_| bad())?,
            Some(Value::Number(n)) => n.as_u64().and_then(|n| u32::try_from(n).ok()).ok_or_else(bad)?,
            Some(_) => return Err(bad()),
        };
        if n == 0 || n > MAX_SECONDS {
            return Err(bad());
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn seconds_are_strings_or_numbers_within_range() {
        assert_eq!(GenerateVideo::parse_seconds(None).unwrap(), 4);
        assert_eq!(GenerateVideo::parse_seconds(Some(&json!("8"))).unwrap(), 8);
        assert_eq!(GenerateVideo::parse_seconds(Some(&json!(12))).unwrap(), 12);
        for bad in [json!("0"), json!("61"), json!("four"), json!(1.5), json!([4])] {
            let e = GenerateVideo::parse_seconds(Some(&bad)).unwrap_err();
            assert_eq!(e.param.as_deref(), Some("seconds"), "{bad}");
        }
    }
}

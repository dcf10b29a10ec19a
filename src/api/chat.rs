//! Wire types of the text routes (`/v1/chat/completions`, `/v1/completions`, `/v1/embeddings`): an envelope that
//! reads only what easel needs (model, stream, stream_options, token limits, prompt size) and keeps every field's
//! JSON text exactly as the client sent it, and the `usage` object of answers.

use std::fmt;

use serde::de::{IgnoredAny, MapAccess, Visitor};
use serde::{Deserialize, Deserializer};
use serde_json::value::RawValue;

/// A text request body: its top-level fields in the client's order, each value as the client wrote it.
#[derive(Debug)]
pub struct TextBody {
    fields: Vec<(String, Box<RawValue>)>,
}

impl<'de> Deserialize<'de> for TextBody {
    fn deserialize<D: Deserializer<'de>>(de: D) -> Result<Self, D::Error> {
        struct Fields;
        impl<'de> Visitor<'de> for Fields {
            type Value = TextBody;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<TextBody, A::Error> {
                let mut fields = Vec::new();
                while let Some((k, v)) = map.next_entry::<String, Box<RawValue>>()? {
                    fields.push((k, v));
                }
                Ok(TextBody { fields })
            }
        }
        de.deserialize_map(Fields)
    }
}

impl TextBody {
    /// Parses a JSON object body.
    pub fn parse(body: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(body)
    }

    fn raw(&self, key: &str) -> Option<&RawValue> {
        self.fields.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_ref())
    }

    fn get<'a, T: Deserialize<'a>>(&'a self, key: &str) -> Option<Result<T, serde_json::Error>> {
        self.raw(key).map(|v| serde_json::from_str(v.get()))
    }

    /// `model`: `None` when absent, an error when it is not a string.
    pub fn model(&self) -> Result<Option<String>, &'static str> {
        match self.get::<String>("model") {
            None => Ok(None),
            Some(Ok(m)) => Ok(Some(m)),
            Some(Err(_)) => Err("`model` must be a string"),
        }
    }

    /// `stream: true` (anything else, including `null`, is not streaming).
    pub fn stream(&self) -> bool {
        matches!(self.get::<Option<bool>>("stream"), Some(Ok(Some(true))))
    }

    /// Whether the client asked for the final usage chunk (`stream_options.include_usage: true`).
    pub fn include_usage(&self) -> bool {
        #[derive(Deserialize)]
        struct Options {
            include_usage: Option<bool>,
        }
        matches!(self.get::<Option<Options>>("stream_options"), Some(Ok(Some(Options { include_usage: Some(true) }))))
    }

    /// The completion token limit the client set (`max_completion_tokens`, else `max_tokens`).
    pub fn max_tokens(&self) -> Option<u64> {
        ["max_completion_tokens", "max_tokens"]
            .into_iter()
            .find_map(|k| self.get::<Option<u64>>(k).and_then(Result::ok).flatten())
    }

    /// Bytes of the prompt as sent (`messages`, `prompt` or `input`): the base of a token estimate.
    pub fn prompt_bytes(&self) -> usize {
        ["messages", "prompt", "input"].into_iter().filter_map(|k| self.raw(k)).map(|v| v.get().len()).sum()
    }

    /// Replaces a field (keeping its place) or appends it.
    pub fn set(&mut self, key: &str, value: Box<RawValue>) {
        match self.fields.iter_mut().find(|(k, _)| k == key) {
            Some((_, v)) => *v = value,
            None => self.fields.push((key.to_owned(), value)),
        }
    }

    /// Asks for the final usage chunk, keeping the client's other stream options.
    pub fn request_usage(&mut self) -> Result<(), serde_json::Error> {
        let mut options = match self.get::<Option<serde_json::Map<String, serde_json::Value>>>("stream_options") {
            Some(Ok(Some(m))) => m,
            _ => serde_json::Map::new(),
        };
        options.insert("include_usage".into(), serde_json::Value::Bool(true));
        let raw = serde_json::value::to_raw_value(&options)?;
        self.set("stream_options", raw);
        Ok(())
    }

    /// The body as JSON: every value's text unchanged.
    pub fn to_vec(&self) -> Vec<u8> {
        let len: usize = self.fields.iter().map(|(k, v)| k.len() + v.get().len() + 4).sum();
        let mut out = Vec::with_capacity(len + 2);
        out.push(b'{');
        for (i, (k, v)) in self.fields.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            // A key re-encoded as a JSON string (serializing a `String` cannot fail).
            out.extend_from_slice(serde_json::to_string(k).unwrap_or_default().as_bytes());
            out.push(b':');
            out.extend_from_slice(v.get().as_bytes());
        }
        out.push(b'}');
        out
    }
}

/// Token counts of an answer (chat, completions and embeddings all report `prompt_tokens`).
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
pub struct Usage {
    #[serde(default)]
    pub prompt_tokens: u64,
    #[serde(default)]
    pub completion_tokens: u64,
}

/// The parts of an answer or a stream chunk easel reads.
#[derive(Debug, Deserialize)]
pub struct UsageCarrier {
    pub choices: Option<Vec<IgnoredAny>>,
    pub usage: Option<Usage>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_model_and_stream_options_change_and_other_values_keep_their_text() {
        let sent = br#"{"messages":[{"role":"user","content":"h\u00e9  llo"}],"model":"a","stream":true,"stream_options":{"include_obfuscation":false},"x":1.50}"#;
        let mut body = TextBody::parse(sent).unwrap();
        assert!(body.stream() && !body.include_usage());
        body.set("model", serde_json::value::to_raw_value("up").unwrap());
        body.request_usage().unwrap();
        let out = String::from_utf8(body.to_vec()).unwrap();
        assert_eq!(
            out,
            r#"{"messages":[{"role":"user","content":"h\u00e9  llo"}],"model":"up","stream":true,"stream_options":{"include_obfuscation":false,"include_usage":true},"x":1.50}"#
        );
    }
}

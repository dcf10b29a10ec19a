//! The one rule for `extra` (the object a request passes to the backend's native body): it may tune how an image
//! is made, never what the request costs or where it runs. Fields that decide the count, the model, the size, the
//! quality or the duration are refused before anything is held or sent ([`check`]); adapters merge `extra` through
//! [`merge`], which applies the same rule again, so no adapter can let `extra` override easel's own fields.

use serde_json::{Map, Value};

use super::RequestError;

/// Native field names (any backend's) that decide cost or routing, compared after lowercasing and mapping `-` to
/// `_`. Grouped by what they decide.
const PROTECTED: &[&str] = &[
    // how many images
    "n",
    "batch_size",
    "n_iter",
    "batch_count",
    "num_images",
    "num_outputs",
    "number_of_images",
    "image_count",
    "samples",
    // which model (and so which price and which GPU)
    "model",
    "model_name",
    "model_id",
    "upstream_model",
    "checkpoint",
    "ckpt",
    "sd_model_checkpoint",
    "version",
    "model_version",
    "deployment",
    // how large
    "size",
    "width",
    "height",
    "image_size",
    "aspect_ratio",
    "resolution",
    "enable_hr",
    "hr_scale",
    "hr_resize_x",
    "hr_resize_y",
    "megapixels",
    // how good
    "quality",
    // how long (video)
    "duration",
    "seconds",
    "num_frames",
    "frames",
    "length",
];

/// Objects inside `extra` whose keys are also checked: A1111's `override_settings` can switch the checkpoint.
const NESTED: &[&str] = &["override_settings"];

/// Whether `key` is a field `extra` may never set.
pub fn is_protected(key: &str) -> bool {
    let normalized: String = key.trim().chars().map(|c| if c == '-' { '_' } else { c.to_ascii_lowercase() }).collect();
    PROTECTED.contains(&normalized.as_str())
}

/// Refuses an `extra` that tries to set a protected field: 400 naming it (`param` = `extra.<field>`).
pub fn check(extra: &Map<String, Value>) -> Result<(), RequestError> {
    for (key, value) in extra {
        if is_protected(key) {
            return Err(refused(&format!("extra.{key}"), key));
        }
        if NESTED.contains(&key.as_str())
            && let Some(inner) = value.as_object()
            && let Some(bad) = inner.keys().find(|k| is_protected(k))
        {
            return Err(refused(&format!("extra.{key}.{bad}"), bad));
        }
    }
    Ok(())
}

fn refused(param: &str, key: &str) -> RequestError {
    RequestError::param(
        param,
        format!(
            "`{param}` cannot be set: `{key}` decides what a request costs or where it runs (count, model, size, \
             quality or duration); use easel's own request fields and the model's configuration instead"
        ),
    )
    .with_code("protected_field")
}

/// Merges `extra` into a native body: its fields are added or replace easel's tuning fields, except the protected
/// ones, which keep easel's value whatever `extra` says (they were refused by [`check`] already).
pub fn merge(body: &mut Map<String, Value>, extra: Option<&Map<String, Value>>) {
    for (key, value) in extra.into_iter().flatten() {
        if is_protected(key) {
            continue;
        }
        match (value, body.get_mut(key)) {
            (Value::Object(more), Some(Value::Object(ours))) if NESTED.contains(&key.as_str()) => {
                for (k, v) in more {
                    if !is_protected(k) {
                        ours.insert(k.clone(), v.clone());
                    }
                }
            }
            _ => {
                body.insert(key.clone(), value.clone());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap_or_default()
    }

    #[test]
    fn protected_fields_are_refused_by_name() {
        for (extra, param) in [
            (json!({"n": 8}), "extra.n"),
            (json!({"NUM_IMAGES": 4}), "extra.NUM_IMAGES"),
            (json!({"batch-size": 4}), "extra.batch-size"),
            (json!({"model": "premium"}), "extra.model"),
            (json!({"size": "4096x4096"}), "extra.size"),
            (json!({"override_settings": {"sd_model_checkpoint": "x"}}), "extra.override_settings.sd_model_checkpoint"),
            (json!({"duration": 60}), "extra.duration"),
        ] {
            let err = check(&obj(extra)).unwrap_err();
            assert_eq!(err.param.as_deref(), Some(param));
            assert_eq!(err.code, Some("protected_field"));
        }
        assert!(
            check(&obj(json!({"sampler_name": "Euler", "override_settings": {"CLIP_stop_at_last_layers": 2}}))).is_ok()
        );
    }

    #[test]
    fn merge_never_overrides_protected_fields() {
        let mut body = obj(json!({"n": 1, "model": "cheap", "override_settings": {"sd_model_checkpoint": "a"}}));
        merge(
            &mut body,
            Some(&obj(
                json!({"n": 8, "model": "premium", "style": "x", "override_settings": {"sd_model_checkpoint": "b", "eta": 1}}),
            )),
        );
        assert_eq!(body["n"], 1);
        assert_eq!(body["model"], "cheap");
        assert_eq!(body["style"], "x");
        assert_eq!(body["override_settings"], json!({"sd_model_checkpoint": "a", "eta": 1}));
    }
}

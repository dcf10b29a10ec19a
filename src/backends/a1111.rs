//! `a1111`: owns the AUTOMATIC1111 / Forge / SD.Next `sdapi/v1` protocol (the webui must run with `--api` or
//! `--nowebui`): generations through `POST /sdapi/v1/txt2img`, edits through `POST /sdapi/v1/img2img`, cancel
//! through `POST /sdapi/v1/interrupt`. Protocol notes: `shared/protocols/a1111.md`.
//!
//! What easel sends, and why:
//! - `prompt`, `negative_prompt` (empty when none), `seed` (the call's, else `-1` = A1111 picks; seeds above
//!   2^32−1 are folded to their low 32 bits, the range A1111 itself draws random seeds from).
//! - `width`/`height` rounded **down** to a multiple of 8 (at least 8): A1111 works on a latent 8× smaller, so
//!   it would produce that size anyway; rounding down never exceeds the model's size limit.
//! - `steps`: the request's (or the model's `steps`), else 20, always sent explicitly because the server's own
//!   default (50) is slow. `cfg_scale` only when `guidance_scale` is set (else the server's 7.0).
//! - `batch_size` = the call's count (at most `max_images_per_call`, default 4), `n_iter` = 1, so `n` images are
//!   one forward pass; `send_images: true`, `save_images: false` (no grid, nothing written on the server).
//! - The model's `upstream_model` picks the checkpoint through `override_settings.sd_model_checkpoint` with
//!   `override_settings_restore_afterwards: false` (kept loaded: restoring would reload weights on every call).
//!   It may be a title, model name, file name or hash from `GET /sdapi/v1/sd-models`. `upstream_model: current`
//!   (or an empty one) sends no override and uses whatever is loaded. A1111 silently ignores checkpoint names it
//!   does not know, so easel checks `info.sd_model_name` and fails the call when another checkpoint ran.
//! - The request's `extra` is merged at the top level and wins key by key; an `override_settings` object in it is
//!   merged into easel's (so `extra: {override_settings: {CLIP_stop_at_last_layers: 2}}` keeps the checkpoint).
//! - `api_key: user:pass` is sent as HTTP Basic auth, which is what `--api-auth user:pass` expects; a key without
//!   `:` is refused when the backend is built (a proxy's bearer token goes in `headers` instead).
//!
//! The answer's `images` are bare base64; `info` is a JSON string whose `index_of_first_image` says how many
//! leading images are grids, and Forge appends extras (ControlNet maps) after the results, so easel takes
//! `batch_size` images from `index_of_first_image`. A prompt A1111 rewrote (styles, wildcards) comes back as
//! `revised_prompt`. A 404 `{"detail": "Not Found"}` means the webui runs without `--api` and says so.
//!
//! When the client goes away, easel sends `POST /sdapi/v1/interrupt` and waits for the interrupted call to return
//! before releasing the slot. A1111 runs one job at a time and interrupt stops whatever runs, so keep
//! `concurrency.images` at 1 (the default) when other clients share the server.
//!
//! Health: `GET /sdapi/v1/progress?skip_current_image=true` (answers even mid-generation) for liveness, then
//! `GET /sdapi/v1/options` for readiness (`sd_model_checkpoint` set); `forge_preset` there means Forge.

use std::borrow::Cow;
use std::sync::Arc;

use base64::Engine;
use reqwest::{Method, RequestBuilder};
use serde::ser::{SerializeMap, Serializer};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use super::client::Http;
use super::{Backend, BackendError, EditInputs, Failure, ImageCall, ImageOutput, ProbeReport, image_from_b64_in};
use crate::config::BackendConfig;

pub const KIND: &str = "a1111";

/// Steps sent when neither the request nor the model sets them (the server's own default, 50, is slow).
const DEFAULT_STEPS: u32 = 20;
/// `upstream_model` value that means "whatever checkpoint is loaded".
const CURRENT_CHECKPOINT: &str = "current";

const TXT2IMG: &str = "/sdapi/v1/txt2img";
const IMG2IMG: &str = "/sdapi/v1/img2img";
const PROGRESS: &str = "/sdapi/v1/progress?skip_current_image=true";
const OPTIONS: &str = "/sdapi/v1/options";
const INTERRUPT: &str = "/sdapi/v1/interrupt";

/// What a 404 `{"detail": "Not Found"}` on `/sdapi/*` means.
const NO_API_HINT: &str = "started without --api? AUTOMATIC1111/Forge serve /sdapi/* only when started with --api \
                           (or --nowebui); add it to the webui's command line (COMMANDLINE_ARGS)";

#[derive(Debug)]
pub struct A1111Backend {
    /// The pooled client; `cfg.api_key` (`user:pass`) is read from it per request, never copied out of its
    /// `Secret`.
    http: Http,
}

impl A1111Backend {
    pub fn new(cfg: Arc<BackendConfig>) -> Result<Self, String> {
        if cfg.api_key.as_ref().is_some_and(|k| !k.expose().contains(':')) {
            return Err(format!(
                "backend `{}` (a1111): `api_key` must be `user:pass`, as given to the webui's --api-auth (it is \
                 sent as HTTP Basic auth)",
                cfg.name
            ));
        }
        Ok(Self { http: Http::new(cfg)? })
    }

    /// Adds HTTP Basic auth when the backend has `api_key: user:pass`.
    fn authed(&self, rb: RequestBuilder) -> RequestBuilder {
        match self.http.cfg.api_key.as_ref().and_then(|k| k.expose().split_once(':')) {
            Some((user, pass)) => rb.basic_auth(user, Some(pass)),
            None => rb,
        }
    }

    /// Sends with auth, turning A1111's 404s into what they mean.
    async fn send(&self, rb: RequestBuilder, url: &str) -> Result<reqwest::Response, BackendError> {
        self.http.send(self.authed(rb), url).await.map_err(explain_404)
    }

    /// Stops the running job; failures are only logged (the call is being abandoned anyway).
    async fn interrupt(&self) {
        let (rb, url) = self.http.request(Method::POST, INTERRUPT);
        if let Err(e) = self.send(rb.json(&json!({})), &url).await {
            tracing::warn!(backend = %self.http.cfg.name, error = %e, "Interrupting A1111 failed.");
        }
    }

    fn invalid(&self, url: &str, detail: impl Into<String>) -> BackendError {
        self.http.error(url, Failure::InvalidResponse(detail.into()))
    }
}

impl Backend for A1111Backend {
    async fn generate_images(&self, call: ImageCall<'_>) -> Result<Vec<ImageOutput>, BackendError> {
        let req = call.request;
        let checkpoint = checkpoint_override(&call.model.upstream_model);
        let path = if call.edit.is_some() { IMG2IMG } else { TXT2IMG };
        let (rb, url) = self.http.request(Method::POST, path);
        if call.cancel.is_cancelled() {
            // Gone before anything was sent: an interrupt now would stop someone else's job.
            return Err(self.http.error(&url, Failure::JobFailed("cancelled: the client went away".into())));
        }
        let edit = match call.edit {
            None => None,
            Some(inputs) => Some(edit_body(inputs).await.map_err(|e| self.http.error(&url, Failure::Rejected(e)))?),
        };
        let body = GenerationBody {
            prompt: &req.prompt,
            negative_prompt: req.negative_prompt.as_deref().unwrap_or(""),
            seed: wire_seed(call.seed),
            width: multiple_of_8(call.size.width),
            height: multiple_of_8(call.size.height),
            steps: req.steps.unwrap_or(DEFAULT_STEPS),
            cfg_scale: req.guidance_scale,
            batch_size: call.count,
            checkpoint,
            edit,
            extra: req.extra.as_ref(),
        };
        let send = self.send(rb.json(&body), &url);
        tokio::pin!(send);
        let resp = tokio::select! {
            r = &mut send => r?,
            () = call.cancel.cancelled() => {
                self.interrupt().await;
                // A1111 stops at the next step and then answers the blocked call; waiting for that (bounded by
                // `timeout`, like any call) keeps the slot held until the GPU is free.
                if let Err(e) = send.await {
                    tracing::debug!(backend = %self.http.cfg.name, error = %e, "Interrupted A1111 call ended.");
                }
                return Err(self.http.error(
                    &url,
                    Failure::JobFailed("cancelled: the client went away (A1111 interrupted)".into()),
                ));
            }
        };
        let raw = self.http.body(resp, &url).await?;
        let answer: GenerationAnswer<'_> = serde_json::from_slice(&raw)
            .map_err(|e| self.invalid(&url, format!("the JSON body does not match the protocol: {e}")))?;
        let info = answer.info();
        if let Some(wanted) = checkpoint
            && let Some(ran) = info.sd_model_name.as_deref()
            && !checkpoint_matches(wanted, ran, info.sd_model_hash.as_deref())
        {
            return Err(self.http.error(
                &url,
                Failure::JobFailed(format!(
                    "A1111 generated with checkpoint `{ran}` instead of `{wanted}`: it ignores checkpoint names it \
                     does not know; set the model's `upstream_model` to a title or model_name from GET \
                     /sdapi/v1/sd-models"
                )),
            ));
        }
        let results = select_results(&answer.images, &info, call.count).map_err(|e| self.invalid(&url, e))?;
        results
            .into_iter()
            .enumerate()
            .map(|(k, b64)| {
                let mut image =
                    image_from_b64_in(&raw, b64).map_err(|e| self.invalid(&url, format!("image {k}: {e}")))?;
                image.revised_prompt = info.all_prompts.get(k).filter(|p| **p != req.prompt).cloned();
                Ok(image)
            })
            .collect()
    }

    async fn probe(&self) -> Result<ProbeReport, BackendError> {
        let (rb, url) = self.http.request(Method::GET, PROGRESS);
        self.send(rb, &url).await?;
        let (rb, url) = self.http.request(Method::GET, OPTIONS);
        let resp = self.send(rb, &url).await?;
        let options: Value = self.http.json(resp, &url).await?;
        if !options.is_object() {
            return Err(self.invalid(&url, "`/sdapi/v1/options` did not answer a settings object"));
        }
        Ok(describe(&options))
    }

    fn supports_edits(&self) -> bool {
        true
    }
}

/// The checkpoint to ask for, or `None` to use the loaded one.
fn checkpoint_override(upstream_model: &str) -> Option<&str> {
    let name = upstream_model.trim();
    (!name.is_empty() && name != CURRENT_CHECKPOINT).then_some(name)
}

/// `-1` (A1111 picks) or the seed folded into 0..2^32.
fn wire_seed(seed: Option<u64>) -> i64 {
    seed.map_or(-1, |s| i64::from((s & u64::from(u32::MAX)) as u32))
}

/// Rounds down to a multiple of 8, at least 8.
fn multiple_of_8(side: u32) -> u32 {
    (side / 8 * 8).max(8)
}

/// A 404 `{"detail": "Not Found"}` is a missing route (no `--api`); any other 404 detail ("Sampler not found" in
/// older builds, "Init image not found") is A1111 refusing something the request named.
fn explain_404(mut e: BackendError) -> BackendError {
    if let Failure::Status { status: 404, message, hint, .. } = &mut e.failure {
        if message.is_empty() || message.eq_ignore_ascii_case("not found") {
            *hint = Some(NO_API_HINT.into());
        } else {
            e.failure = Failure::Rejected(format!("{message} (HTTP 404)"));
        }
    }
    e
}

/// Whether the checkpoint that ran (`info.sd_model_name`, a file stem, and `sd_model_hash`) is the one asked for
/// by any of A1111's aliases: title (`v1-5.safetensors [6ce0161689]`), name (`sub/v1-5.safetensors`), model name,
/// short hash or sha256.
fn checkpoint_matches(wanted: &str, ran: &str, ran_hash: Option<&str>) -> bool {
    let without_hash = match wanted.rsplit_once(" [") {
        Some((name, hash)) if hash.ends_with(']') => name,
        _ => wanted,
    };
    let base = without_hash.rsplit(['/', '\\']).next().unwrap_or(without_hash);
    let stem =
        [".safetensors", ".ckpt", ".gguf", ".pt", ".bin"].iter().find_map(|ext| base.strip_suffix(ext)).unwrap_or(base);
    if stem == ran {
        return true;
    }
    match ran_hash {
        Some(h) if h.len() >= 8 => wanted.starts_with(h) || wanted.ends_with(&format!("[{h}]")),
        _ => false,
    }
}

/// The readiness report from `/sdapi/v1/options`.
fn describe(options: &Value) -> ProbeReport {
    let flavour = if options.get("forge_preset").is_some() { "Forge" } else { "AUTOMATIC1111" };
    match options.get("sd_model_checkpoint").and_then(Value::as_str) {
        Some(ckpt) if !ckpt.is_empty() => ProbeReport { ready: true, detail: format!("{flavour}, checkpoint {ckpt}") },
        _ => ProbeReport { ready: false, detail: format!("{flavour} with no checkpoint loaded") },
    }
}

/// img2img's inputs: the images as base64, and the OpenAI mask (transparent = edit) converted to A1111's (white =
/// repaint, on black).
async fn edit_body(inputs: &EditInputs) -> Result<EditBody, String> {
    let engine = crate::media::base64_encoder();
    let init_images = inputs.images.iter().map(|i| engine.encode(&i.bytes)).collect();
    let mask = match &inputs.mask {
        Some(m) => {
            let bytes = m.bytes.clone();
            let converted = crate::media::run_decoding(&[&m.bytes], move || {
                crate::media::mask_to_white_repaint(&bytes).map_err(crate::media::DecodeError::Invalid)
            })
            .await
            .map_err(|e| format!("`mask`: {e}"))?;
            Some(engine.encode(converted))
        }
        None => None,
    };
    Ok(EditBody { init_images, mask })
}

// === wire types ===

/// The txt2img/img2img body, borrowing the request's strings. `extra` wins key by key (see [`Fields`]).
struct GenerationBody<'a> {
    prompt: &'a str,
    negative_prompt: &'a str,
    seed: i64,
    width: u32,
    height: u32,
    steps: u32,
    cfg_scale: Option<f64>,
    batch_size: u32,
    checkpoint: Option<&'a str>,
    edit: Option<EditBody>,
    extra: Option<&'a Map<String, Value>>,
}

/// img2img's own fields (base64 has to be made, so it is owned).
struct EditBody {
    init_images: Vec<String>,
    mask: Option<String>,
}

impl Serialize for GenerationBody<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(None)?;
        let mut f = Fields { map: &mut map, extra: self.extra };
        f.put("prompt", self.prompt)?;
        f.put("negative_prompt", self.negative_prompt)?;
        f.put("seed", &self.seed)?;
        f.put("width", &self.width)?;
        f.put("height", &self.height)?;
        f.put("steps", &self.steps)?;
        if let Some(cfg) = self.cfg_scale {
            f.put("cfg_scale", &cfg)?;
        }
        f.put("batch_size", &self.batch_size)?;
        f.put("n_iter", &1)?;
        f.put("send_images", &true)?;
        f.put("save_images", &false)?;
        if let Some(edit) = &self.edit {
            f.put("init_images", &edit.init_images)?;
            if let Some(mask) = &edit.mask {
                f.put("mask", mask)?;
            }
        }
        // An `override_settings` object in `extra` is merged with the checkpoint rather than replacing it.
        let extra_overrides = self.extra.and_then(|e| e.get("override_settings")).and_then(Value::as_object);
        let merged = match (self.checkpoint, extra_overrides) {
            (Some(checkpoint), Some(more)) => {
                map.serialize_entry("override_settings", &OverrideSettings { checkpoint, more: Some(more) })?;
                true
            }
            (Some(checkpoint), None) => {
                Fields { map: &mut map, extra: self.extra }
                    .put("override_settings", &OverrideSettings { checkpoint, more: None })?;
                false
            }
            (None, _) => false,
        };
        let mut f = Fields { map: &mut map, extra: self.extra };
        if self.checkpoint.is_some() {
            f.put("override_settings_restore_afterwards", &false)?;
        }
        for (key, value) in self.extra.into_iter().flatten() {
            if !(crate::request::extra::is_protected(key) || merged && key == "override_settings") {
                map.serialize_entry(key, value)?;
            }
        }
        map.end()
    }
}

/// Writes easel's fields, skipping those `extra` sets (it wins).
struct Fields<'m, M> {
    map: &'m mut M,
    extra: Option<&'m Map<String, Value>>,
}

impl<M: SerializeMap> Fields<'_, M> {
    fn put<V: Serialize + ?Sized>(&mut self, key: &str, value: &V) -> Result<(), M::Error> {
        // `extra` wins for tuning fields, never for the protected ones (count, model, size: see request::extra).
        if self.extra.is_some_and(|e| e.contains_key(key)) && !crate::request::extra::is_protected(key) {
            return Ok(());
        }
        self.map.serialize_entry(key, value)
    }
}

/// `{"sd_model_checkpoint": …}` plus the request's own overrides (which win).
struct OverrideSettings<'a> {
    checkpoint: &'a str,
    more: Option<&'a Map<String, Value>>,
}

impl Serialize for OverrideSettings<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(None)?;
        Fields { map: &mut map, extra: self.more }.put("sd_model_checkpoint", self.checkpoint)?;
        for (key, value) in self.more.into_iter().flatten() {
            if crate::request::extra::is_protected(key) {
                continue;
            }
            map.serialize_entry(key, value)?;
        }
        map.end()
    }
}

/// The part of a txt2img/img2img answer easel reads; base64 is borrowed from the response buffer.
#[derive(Debug, Deserialize)]
struct GenerationAnswer<'a> {
    #[serde(default, borrow)]
    images: Vec<Text<'a>>,
    /// A JSON string holding [`Info`] (an object in some forks).
    #[serde(default)]
    info: Option<Value>,
}

/// A JSON string borrowed from the buffer when it has no escapes (serde borrows a `Cow` only as a field of its
/// own, not as a `Vec` element).
#[derive(Debug, Deserialize)]
struct Text<'a>(#[serde(borrow)] Cow<'a, str>);

/// The fields of `info` easel uses.
#[derive(Debug, Default, Deserialize)]
struct Info {
    /// Leading grid images to skip (1 when `save_images` made a grid).
    #[serde(default)]
    index_of_first_image: usize,
    /// The prompt of each result, after styles and wildcards.
    #[serde(default)]
    all_prompts: Vec<String>,
    /// The stem of the checkpoint file that ran.
    #[serde(default)]
    sd_model_name: Option<String>,
    #[serde(default)]
    sd_model_hash: Option<String>,
}

// === response parsing ===

impl GenerationAnswer<'_> {
    /// `info`, parsed from its JSON string; an unreadable one reads as "no grid, nothing known".
    fn info(&self) -> Info {
        let parsed = match &self.info {
            Some(Value::String(text)) => serde_json::from_str(text).ok(),
            Some(obj @ Value::Object(_)) => Info::deserialize(obj).ok(),
            _ => None,
        };
        parsed.unwrap_or_default()
    }
}

/// The `count` results: after the grids (`index_of_first_image`) and before any extras.
fn select_results<'b>(images: &'b [Text<'_>], info: &Info, count: u32) -> Result<Vec<&'b str>, String> {
    let results: Vec<&str> =
        images.iter().skip(info.index_of_first_image).take(count as usize).map(|t| t.0.as_ref()).collect();
    if results.is_empty() {
        return Err(format!(
            "the answer holds {} image(s), none after index_of_first_image {} (is `send_images` false in `extra`?)",
            images.len(),
            info.index_of_first_image
        ));
    }
    Ok(results)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A txt2img answer as A1111 1.10 writes it with `save_images: true` and `batch_size: 2` (grid first), base64
    /// shortened to a 1×1 PNG.
    const RECORDED: &str = r#"{"images": ["GRID", "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4z8AAAAMBAQDJ/pLvAAAAAElFTkSuQmCC", "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4z8AAAAMBAQDJ/pLvAAAAAElFTkSuQmCC", "CONTROLNET-MAP"], "parameters": {"prompt": "a barn", "batch_size": 2}, "info": "{\"prompt\": \"a barn\", \"all_prompts\": [\"a barn\", \"a barn, red\"], \"negative_prompt\": \"\", \"seed\": 10, \"all_seeds\": [10, 11], \"width\": 512, \"height\": 512, \"sampler_name\": \"Euler\", \"cfg_scale\": 7.0, \"steps\": 20, \"batch_size\": 2, \"sd_model_name\": \"v1-5-pruned-emaonly\", \"sd_model_hash\": \"6ce0161689\", \"index_of_first_image\": 1, \"infotexts\": [\"a barn\\nSteps: 20\", \"a barn, red\\nSteps: 20\"], \"version\": \"v1.10.1\"}"}"#;

    #[test]
    fn reads_a_recorded_answer_skipping_the_grid_and_extras() {
        let answer: GenerationAnswer<'_> = serde_json::from_str(RECORDED).unwrap();
        assert!(matches!(answer.images[1].0, Cow::Borrowed(_)), "base64 is borrowed, not copied");
        let info = answer.info();
        assert_eq!(info.index_of_first_image, 1);
        assert_eq!(info.all_prompts[1], "a barn, red");
        let picked = select_results(&answer.images, &info, 2).unwrap();
        assert_eq!(picked.len(), 2);
        assert!(picked.iter().all(|b| b.starts_with("iVBOR")), "neither the grid nor the extra: {picked:?}");
        crate::backends::decode_image_b64(picked[0]).unwrap();

        let empty: GenerationAnswer<'_> = serde_json::from_str(r#"{"images": [], "info": "{}"}"#).unwrap();
        assert!(select_results(&empty.images, &empty.info(), 1).unwrap_err().contains("send_images"));
        let odd: GenerationAnswer<'_> = serde_json::from_str(r#"{"images": ["a"], "info": "not json"}"#).unwrap();
        assert_eq!(odd.info().index_of_first_image, 0, "an unreadable info means no grid");
    }

    #[test]
    fn sends_easel_fields_with_extra_winning_and_overrides_merged() {
        let extra: Map<String, Value> = serde_json::from_value(
            json!({"steps": 5, "sampler_name": "DPM++ 2M", "override_settings": {"CLIP_stop_at_last_layers": 2}}),
        )
        .unwrap();
        let body = GenerationBody {
            prompt: "say \"hi\"",
            negative_prompt: "",
            seed: wire_seed(Some((1 << 32) + 7)),
            width: multiple_of_8(100),
            height: multiple_of_8(5),
            steps: 20,
            cfg_scale: None,
            batch_size: 3,
            checkpoint: checkpoint_override("v1-5"),
            edit: None,
            extra: Some(&extra),
        };
        let v = serde_json::to_value(&body).unwrap();
        assert_eq!(v["prompt"], "say \"hi\"");
        assert_eq!((v["seed"].as_i64(), v["width"].as_u64(), v["height"].as_u64()), (Some(7), Some(96), Some(8)));
        assert_eq!(v["steps"], 5, "extra wins");
        assert_eq!(v["sampler_name"], "DPM++ 2M");
        assert_eq!(v["override_settings"], json!({"sd_model_checkpoint": "v1-5", "CLIP_stop_at_last_layers": 2}));
        assert_eq!(v["override_settings_restore_afterwards"], false);
        assert!(v.get("cfg_scale").is_none(), "the server's default guidance");
        let text = serde_json::to_string(&body).unwrap();
        assert_eq!(text.matches("\"steps\"").count(), 1, "no duplicate keys: {text}");
        assert_eq!(text.matches("\"override_settings\"").count(), 1, "no duplicate keys: {text}");

        let plain = GenerationBody { checkpoint: checkpoint_override("current"), extra: None, ..body };
        let v = serde_json::to_value(&plain).unwrap();
        assert!(v.get("override_settings").is_none() && v.get("override_settings_restore_afterwards").is_none());
        assert_eq!((v["batch_size"].as_u64(), v["n_iter"].as_u64()), (Some(3), Some(1)));
        assert_eq!((v["send_images"].as_bool(), v["save_images"].as_bool()), (Some(true), Some(false)));
        assert_eq!(wire_seed(None), -1);
        assert_eq!(checkpoint_override(" "), None);
    }

    #[test]
    fn knows_every_alias_of_a_checkpoint() {
        let ran = ("v1-5-pruned-emaonly", Some("6ce0161689"));
        for wanted in [
            "v1-5-pruned-emaonly",
            "v1-5-pruned-emaonly.safetensors",
            "v1-5-pruned-emaonly.safetensors [6ce0161689]",
            "SD1/v1-5-pruned-emaonly.ckpt",
            "6ce0161689",
            "6ce0161689d0bf5a4a48fbcc8f9a4a4b9c39f4a4b4b8d1bd9e5a0b7b3a2c1d0e",
        ] {
            assert!(checkpoint_matches(wanted, ran.0, ran.1), "{wanted}");
        }
        assert!(!checkpoint_matches("sd_xl_base_1.0.safetensors", ran.0, ran.1));
        assert!(!checkpoint_matches("v1-5", ran.0, None));
    }

    #[test]
    fn tells_a_missing_api_flag_from_a_refused_request() {
        let e = |message: &str| {
            BackendError::new(
                "sd",
                crate::config::BackendKind::A1111,
                "http://h/sdapi/v1/txt2img",
                Failure::Status { status: 404, message: message.into(), hint: None, retry_after: None },
            )
        };
        let no_api = explain_404(e("Not Found")).to_string();
        assert!(no_api.contains("HTTP 404") && no_api.contains("--api"), "{no_api}");
        assert!(matches!(explain_404(e("Sampler not found")).failure, Failure::Rejected(m) if m.contains("Sampler")));
    }

    #[test]
    fn probe_reads_recorded_options() {
        let a1111 = json!({"sd_model_checkpoint": "v1-5-pruned-emaonly.safetensors [6ce0161689]", "samples_format": "png", "sd_checkpoint_hash": "6ce0161689"});
        let r = describe(&a1111);
        assert!(r.ready && r.detail == "AUTOMATIC1111, checkpoint v1-5-pruned-emaonly.safetensors [6ce0161689]");
        let forge = json!({"sd_model_checkpoint": null, "forge_preset": "sd"});
        let r = describe(&forge);
        assert!(!r.ready && r.detail.starts_with("Forge"), "{}", r.detail);
    }

    #[test]
    fn converts_openai_masks() {
        let mask = {
            let img = image::RgbaImage::from_fn(2, 1, |x, _| image::Rgba([0, 0, 0, if x == 0 { 0 } else { 255 }]));
            let mut b = Vec::new();
            image::DynamicImage::ImageRgba8(img)
                .write_to(&mut std::io::Cursor::new(&mut b), image::ImageFormat::Png)
                .unwrap();
            b
        };
        let converted =
            image::load_from_memory(&crate::media::mask_to_white_repaint(&mask).unwrap()).unwrap().to_luma8();
        assert_eq!((converted.get_pixel(0, 0).0[0], converted.get_pixel(1, 0).0[0]), (255, 0));
        assert!(crate::media::mask_to_white_repaint(b"not an image").is_err());
    }
}

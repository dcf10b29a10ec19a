//! Workflow templates for ComfyUI and InvokeAI: a JSON file with minijinja placeholders, loaded and checked at
//! config load (rendered with sample values under strict undefined, then parsed as JSON), rendered per call.
//!
//! Every template can use exactly these variables: `prompt`, `negative_prompt` (empty string when none), `seed`
//! (always an integer: the request's, else a fresh random one), `width`, `height`, `steps` (the request's or the
//! model's, else 20), `cfg` (the request's `guidance_scale` or the model's, else 7.0), `batch_size`, and for edits
//! `image` and `mask` (names of the uploaded inputs; `mask` is the empty string when the edit has none), and
//! `background` (`transparent`, `opaque` or `auto`, as the request asked; a workflow that mentions it is taken to
//! honour `background: transparent`, one that does not refuses it). Video
//! models (`type: video`) also get `seconds` (the clip length asked for), `fps` (the request's `extra.fps`, else
//! 16, the rate most open video models are trained at) and `frames` (`seconds × fps`); their `image` is the
//! uploaded `input_reference` and is only defined when one was sent. Write strings as `{{ prompt | tojson }}` so
//! quotes and newlines stay valid JSON.

use std::path::{Path, PathBuf};

use minijinja::{Environment, UndefinedBehavior};
use serde::Serialize;

/// A loaded, checked workflow template.
#[derive(Debug, Clone)]
pub struct Workflow {
    /// The file it came from, for messages.
    pub path: PathBuf,
    pub source: String,
}

/// The values a template sees for one call.
#[derive(Debug, Clone, Serialize)]
pub struct WorkflowVars<'a> {
    pub prompt: &'a str,
    pub negative_prompt: &'a str,
    pub seed: u64,
    pub width: u32,
    pub height: u32,
    pub steps: u32,
    pub cfg: f64,
    pub batch_size: u32,
    /// `transparent`, `opaque` or `auto` (the request's `background`, `auto` when it set none).
    pub background: &'a str,
    /// Only set for edits: printing it in a generation is an undefined-variable error.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mask: Option<&'a str>,
    /// Only set for videos: printing them in an image workflow is an undefined-variable error.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seconds: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fps: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub frames: Option<u32>,
    /// The model's `upstream_model` (a checkpoint name), so one workflow serves several models.
    pub model: &'a str,
    /// The request's `extra` object (empty when it sent none): `{{ extra.lora | default("none") | tojson }}`.
    pub extra: &'a serde_json::Map<String, serde_json::Value>,
}

/// The `extra` of a request that sent none.
static NO_EXTRA: std::sync::LazyLock<serde_json::Map<String, serde_json::Value>> =
    std::sync::LazyLock::new(serde_json::Map::new);

impl<'a> WorkflowVars<'a> {
    /// The variables of one render: the request's fields with the documented defaults, this render's seed and
    /// batch, and for edits the uploaded input names (`mask` is the empty string when the edit has none).
    pub fn for_call(
        call: &'a super::ImageCall<'a>,
        seed: u64,
        batch_size: u32,
        image: Option<&'a str>,
        mask: Option<&'a str>,
    ) -> Self {
        let req = call.request;
        Self {
            prompt: &req.prompt,
            negative_prompt: req.negative_prompt.as_deref().unwrap_or(""),
            seed,
            width: call.size.width,
            height: call.size.height,
            steps: req.steps.unwrap_or(DEFAULT_STEPS),
            cfg: req.guidance_scale.unwrap_or(DEFAULT_CFG),
            batch_size,
            background: req.background.as_deref().unwrap_or("auto"),
            image,
            mask: if call.edit.is_some() { Some(mask.unwrap_or("")) } else { None },
            seconds: None,
            fps: None,
            frames: None,
            model: &call.model.upstream_model,
            extra: req.extra.as_ref().unwrap_or(&NO_EXTRA),
        }
    }

    /// The variables of a video render: the request's prompt, size (else the model's default), seed, clip length
    /// and frame rate, the model's steps and guidance, and the uploaded reference image when one was sent.
    pub fn for_video(
        req: &'a crate::request::video::GenerateVideo,
        model: &'a crate::config::ModelConfig,
        seed: u64,
        image: Option<&'a str>,
    ) -> Self {
        let size = req.size.unwrap_or(model.default_size);
        let fps = video_fps(req);
        Self {
            prompt: &req.prompt,
            negative_prompt: req.negative_prompt.as_deref().or(model.negative_prompt.as_deref()).unwrap_or(""),
            seed,
            width: size.width,
            height: size.height,
            steps: model.steps.unwrap_or(DEFAULT_STEPS),
            cfg: model.guidance_scale.unwrap_or(DEFAULT_CFG),
            batch_size: 1,
            background: "auto",
            image,
            mask: None,
            seconds: Some(req.seconds),
            fps: Some(fps),
            frames: Some(req.seconds.saturating_mul(fps)),
            model: &model.upstream_model,
            extra: req.extra.as_ref().unwrap_or(&NO_EXTRA),
        }
    }
}

/// Frames per second of a video workflow when the request's `extra` sets no `fps`.
pub const DEFAULT_FPS: u32 = 16;

/// The request's `extra.fps` when it is a whole number in 1..=120, else [`DEFAULT_FPS`].
pub fn video_fps(req: &crate::request::video::GenerateVideo) -> u32 {
    req.extra
        .as_ref()
        .and_then(|e| e.get("fps"))
        .and_then(serde_json::Value::as_u64)
        .filter(|f| (1..=120).contains(f))
        .and_then(|f| u32::try_from(f).ok())
        .unwrap_or(DEFAULT_FPS)
}

/// A fresh seed when the request fixed none (a 32-bit value, which every node type accepts).
pub fn fresh_seed() -> u64 {
    u64::from(rand::random::<u32>())
}

/// Default steps when neither the request nor the model sets them.
pub const DEFAULT_STEPS: u32 = 20;
/// Default guidance when neither the request nor the model sets it.
pub const DEFAULT_CFG: f64 = 7.0;

impl Workflow {
    /// Reads `path` (relative paths resolve against `base`, the config file's folder) and checks it.
    pub fn load(path: &str, base: &Path) -> Result<Self, String> {
        let full = if Path::new(path).is_absolute() { PathBuf::from(path) } else { base.join(path) };
        let source =
            std::fs::read_to_string(&full).map_err(|e| format!("cannot read workflow {}: {e}", full.display()))?;
        let wf = Self { path: full, source };
        wf.check()?;
        Ok(wf)
    }

    /// Renders with sample values (as an edit, so `image`/`mask` are defined) and checks the result is a JSON object.
    pub fn check(&self) -> Result<(), String> {
        check_variables(&self.path.display().to_string(), &self.source, WORKFLOW_VARIABLES)?;
        let sample = WorkflowVars {
            prompt: "a \"quoted\"\nprompt",
            negative_prompt: "blurry",
            seed: 1234,
            width: 512,
            height: 512,
            steps: DEFAULT_STEPS,
            cfg: DEFAULT_CFG,
            batch_size: 1,
            background: "transparent",
            image: Some("input.png"),
            mask: Some("mask.png"),
            seconds: Some(4),
            fps: Some(DEFAULT_FPS),
            frames: Some(4 * DEFAULT_FPS),
            model: "checkpoint.safetensors",
            extra: &NO_EXTRA,
        };
        let v = self.render(&sample)?;
        if !v.is_object() {
            return Err(format!("workflow {} does not render to a JSON object", self.path.display()));
        }
        Ok(())
    }

    /// Whether the template mentions the variable `name` (e.g. `image`, `mask`) anywhere.
    pub fn uses(&self, name: &str) -> bool {
        let mut env = Environment::new();
        let name_str = self.path.display().to_string();
        if env.add_template(&name_str, &self.source).is_err() {
            return false;
        }
        env.get_template(&name_str).is_ok_and(|t| t.undeclared_variables(false).contains(name))
    }

    /// Refuses an edit the template cannot honour: an input image when the template has no `image`, a mask when
    /// it has no `mask`. Returns the offending request field and a sentence naming `model`.
    pub fn edit_refusal(&self, model: &str, edit: &super::EditInputs) -> Option<(&'static str, String)> {
        if !edit.images.is_empty() && !self.uses("image") {
            return Some((
                "image",
                format!(
                    "model `{model}` cannot edit images: its workflow {} has no `image` input (use a model whose workflow loads {{{{ image }}}})",
                    self.path.display()
                ),
            ));
        }
        if edit.mask.is_some() && !self.uses("mask") {
            return Some((
                "mask",
                format!(
                    "model `{model}` cannot use a mask: its workflow {} has no `mask` input; send the edit without `mask`",
                    self.path.display()
                ),
            ));
        }
        None
    }

    /// Renders the template for one call and parses the JSON.
    pub fn render(&self, vars: &WorkflowVars<'_>) -> Result<serde_json::Value, String> {
        let name = self.path.display().to_string();
        let text = render_text(&name, &self.source, vars)?;
        serde_json::from_str(&text).map_err(|e| {
            format!("workflow {name} rendered invalid JSON at line {} column {}: {e} (write strings as {{{{ prompt | tojson }}}})", e.line(), e.column())
        })
    }
}

/// Renders a minijinja template with strict undefined; errors name the template and line.
pub fn render_text(name: &str, source: &str, ctx: impl Serialize) -> Result<String, String> {
    let mut env = Environment::new();
    env.set_undefined_behavior(UndefinedBehavior::Strict);
    // Templates are operator-supplied, but a runaway loop should still end.
    env.set_fuel(Some(1_000_000));
    env.add_template(name, source).map_err(|e| template_error(name, &e))?;
    let tmpl = env.get_template(name).map_err(|e| template_error(name, &e))?;
    tmpl.render(minijinja::value::Serde(&ctx)).map_err(|e| template_error(name, &e))
}

/// Fails when the template uses a variable outside `allowed` (a typo renders as nothing in a filter chain, so
/// strict undefined alone does not catch it).
pub fn check_variables(name: &str, source: &str, allowed: &[&str]) -> Result<(), String> {
    let mut env = Environment::new();
    env.add_template(name, source).map_err(|e| template_error(name, &e))?;
    let tmpl = env.get_template(name).map_err(|e| template_error(name, &e))?;
    let mut unknown: Vec<String> =
        tmpl.undeclared_variables(false).into_iter().filter(|v| !allowed.contains(&v.as_str())).collect();
    if unknown.is_empty() {
        return Ok(());
    }
    unknown.sort();
    let line = source
        .lines()
        .position(|l| l.contains(unknown[0].as_str()))
        .map_or(String::new(), |n| format!(" line {}", n + 1));
    Err(format!(
        "template {name}{line} uses unknown variable(s) `{}`; available: {}",
        unknown.join("`, `"),
        allowed.join(", ")
    ))
}

/// The variables a workflow template may use.
pub const WORKFLOW_VARIABLES: &[&str] = &[
    "prompt",
    "negative_prompt",
    "seed",
    "width",
    "height",
    "steps",
    "cfg",
    "batch_size",
    "background",
    "image",
    "mask",
    "seconds",
    "fps",
    "frames",
    "model",
    "extra",
];

fn template_error(name: &str, e: &minijinja::Error) -> String {
    match e.line() {
        Some(line) => format!("template {name} line {line}: {}", e.detail().unwrap_or(&e.kind().to_string())),
        None => format!("template {name}: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wf(source: &str) -> Workflow {
        Workflow { path: PathBuf::from("wf.json"), source: source.to_owned() }
    }

    #[test]
    fn renders_with_escaping_and_rejects_typos() {
        let w = wf(r#"{"6": {"inputs": {"text": {{ prompt | tojson }}, "seed": {{ seed }}, "w": {{ width }}}}}"#);
        w.check().unwrap();
        let vars = WorkflowVars {
            prompt: "say \"hi\"",
            negative_prompt: "",
            seed: 7,
            width: 64,
            height: 64,
            steps: 1,
            cfg: 1.0,
            batch_size: 1,
            background: "auto",
            image: None,
            mask: None,
            seconds: None,
            fps: None,
            frames: None,
            model: "ckpt",
            extra: &NO_EXTRA,
        };
        let v = w.render(&vars).unwrap();
        assert_eq!(v["6"]["inputs"]["text"], "say \"hi\"");
        assert_eq!(v["6"]["inputs"]["seed"], 7);
        let err = wf("{\"a\":\n {{ promt }}}").check().unwrap_err();
        assert!(err.contains("line 2"), "{err}");
        let err = wf(r#"{"a": "{{ prompt }}"}"#).check().unwrap_err();
        assert!(err.contains("invalid JSON"), "{err}");
        let err = wf(r#"{"image": "{{ image }}"}"#).render(&vars).unwrap_err();
        assert!(err.contains("undefined"), "a generation through an edit workflow: {err}");
    }
}

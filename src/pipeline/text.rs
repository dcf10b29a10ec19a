//! `text`: the story of `POST /v1/chat/completions`, `/v1/completions` and `/v1/embeddings` — a passthrough.
//!
//! 1. Read the envelope (`api::chat`), resolve the text model, rewrite `model` to the upstream's name (and, for a
//!    stream the client did not ask usage for, ask it upstream so credits can be counted).
//! 2. Hold the credit estimate (per request, or prompt bytes / 4 plus the completion limit priced per token).
//! 3. One shared dispatch (admission, timeout, fallback, circuit) up to the upstream's response headers: failover
//!    happens only before the first byte reaches the client, never after.
//! 4. A whole answer is passed back with the upstream's status; a stream is relayed chunk by chunk as the bytes
//!    arrive ([`Relay`]), holding the admission slot until it ends, dropping only the usage chunk easel asked for.
//! 5. Capture what `usage` says (never more than held). A stream cut before its end (the client left, the upstream
//!    broke) is charged by the usage chunk if it already arrived, else released.
//!
//! An `Idempotency-Key` works as on the image routes for a whole answer: the first request claims the key with its
//! hold, its answer is stored once captured, and the same key with the same body replays that answer (charged
//! once); another body is refused. A stream cannot carry one (400): it is relayed as it arrives, so a cut stream
//! has no complete answer to store, and a retry would be charged again without saying so.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::Stream;
use sha2::{Digest, Sha256};

use super::dispatch::dispatch;
use super::images::Caller;
use crate::admission::Permit;
use crate::api::chat::{TextBody, Usage, UsageCarrier};
use crate::backends::{BackendError, Failure};
use crate::config::{Capability, ModelConfig, ModelType, TokenCredits};
use crate::error::Error;
use crate::ledger::{HoldOutcome, IdemClaim, Millicredits, Principal, Store, StoredResponse};
use crate::request::RequestError;
use crate::state::AppState;

/// Most bytes of one SSE event kept to look for `usage` (a longer event is passed on unread).
const MAX_EVENT_BYTES: usize = 1 << 20;

/// Which text route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TextRoute {
    Chat,
    Completions,
    Embeddings,
}

impl TextRoute {
    pub fn path(self) -> &'static str {
        match self {
            TextRoute::Chat => "/v1/chat/completions",
            TextRoute::Completions => "/v1/completions",
            TextRoute::Embeddings => "/v1/embeddings",
        }
    }

    fn operation(self) -> &'static str {
        match self {
            TextRoute::Chat => "chat completions",
            TextRoute::Completions => "completions",
            TextRoute::Embeddings => "embeddings",
        }
    }
}

/// The upstream's answer, on its way to the client.
#[derive(Debug)]
pub struct TextAnswer {
    pub status: u16,
    pub content_type: Option<String>,
    /// Upstream headers clients act on (rate limits, retry advice, processing time), passed on as they came.
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: TextOut,
    /// The stored answer of an earlier request with the same Idempotency-Key.
    pub replayed: bool,
}

#[derive(Debug)]
pub enum TextOut {
    Whole(Bytes),
    Stream(Relay),
    /// The answer is still on its way (a stream waiting for its working set).
    Waiting(Waiting),
}

/// Passes a text request to the model's backend and returns its answer.
pub async fn text(state: &AppState, caller: &Caller, route: TextRoute, raw: &[u8]) -> Result<TextAnswer, Error> {
    let mut body = TextBody::parse(raw).map_err(|e| {
        RequestError::new(format!("the request body is not a JSON object: {e}")).with_code("invalid_json")
    })?;
    let requested = body.model().map_err(|m| RequestError::param("model", m))?;
    let model = state.registry.resolve(requested.as_deref(), ModelType::Text, route.operation())?;
    let stream = route != TextRoute::Embeddings && body.stream();
    let strip_usage = stream && !body.include_usage();
    // The answer names the model as the client did (an alias, or easel's id), not the upstream's own name.
    let rename = Rename::new(&model.upstream_model, requested.as_deref().unwrap_or(&model.id));
    body.set("model", to_raw(&model.upstream_model)?);
    if strip_usage {
        body.request_usage().map_err(|e| Error::Internal(format!("writing stream_options: {e}")))?;
    }
    let estimate = Estimate {
        prompt_tokens: body.prompt_bytes().div_ceil(4) as u64,
        completion_tokens: match route {
            TextRoute::Embeddings => 0,
            _ => body.max_tokens().unwrap_or(u64::from(model.max_output_tokens)),
        },
    };
    let claim = caller.idempotency_key.as_ref().map(|key| IdemClaim {
        key: key.clone(),
        method: "POST".into(),
        path: route.path().into(),
        fingerprint: fingerprint(route, raw),
    });
    if stream && claim.is_some() {
        return Err(RequestError::new(
            "an Idempotency-Key cannot be used with `stream: true`: a stream is relayed as it arrives and cannot be \
             replayed; send the header with `stream: false`, or stream without it",
        )
        .with_code("idempotency_key_with_stream")
        .into());
    }
    let charge = match hold(state, caller, &model, estimate, claim).await? {
        Held::Charge(c) => c,
        Held::Replay(r) => {
            return Ok(TextAnswer {
                status: r.status,
                content_type: Some(r.content_type),
                headers: Vec::new(),
                body: TextOut::Whole(Bytes::from(r.body)),
                replayed: true,
            });
        }
    };
    let out = Outbound { route, forward: Bytes::from(body.to_vec()), stream, strip_usage, rename };

    // A stream whose model waits for its working set answers 200 now and keeps the connection warm while the
    // host swaps; what comes later (the stream, or a failure as an `error` event) follows in the same body.
    if stream && let Some(every) = state.sets.keepalive(&model) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let (st, gone) = (state.clone(), caller.gone.clone());
        spawn(state, async move {
            let opened = open(&st, &model, &gone, out, charge).await;
            let _ = tx.send(opened);
        });
        return Ok(TextAnswer {
            status: 200,
            content_type: Some("text/event-stream".into()),
            headers: Vec::new(),
            body: TextOut::Waiting(Waiting { answer: rx, every }),
            replayed: false,
        });
    }
    let (status, content_type, headers, body) = open(state, &model, &caller.gone, out, charge).await?;
    Ok(TextAnswer { status, content_type, headers, body, replayed: false })
}

/// What goes upstream.
struct Outbound {
    route: TextRoute,
    forward: Bytes,
    stream: bool,
    strip_usage: bool,
    rename: Option<Rename>,
}

/// What a text request's dispatch gave: status, content type, passed headers and the body.
pub type Opened = (u16, Option<String>, Vec<(String, Vec<u8>)>, TextOut);

/// The one dispatch of a text request up to the upstream's answer, and settling a whole one.
async fn open(
    state: &AppState,
    model: &ModelConfig,
    gone: &tokio_util::sync::CancellationToken,
    out: Outbound,
    charge: Option<Charge>,
) -> Result<Opened, Error> {
    let Outbound { route, forward, stream, strip_usage, rename } = out;
    let usable = |h: &crate::routing::BackendHandle| h.adapter.openai_text().is_some();
    let opened = dispatch(state, model, Capability::Text, gone, usable, |handle, permit| {
        let forward = forward.clone();
        async move {
            let Some(b) = handle.adapter.openai_text() else {
                return Err(BackendError::new(
                    &handle.cfg.name,
                    handle.cfg.kind,
                    handle.cfg.endpoint(""),
                    Failure::Unsupported("text"),
                ));
            };
            let (resp, url) = b.send_text(route.path(), forward.to_vec(), stream).await?;
            let status = resp.status().as_u16();
            let content_type =
                resp.headers().get(reqwest::header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).map(str::to_owned);
            let headers = passed_headers(resp.headers());
            if stream {
                let idle = handle.cfg.timeout;
                return Ok((status, content_type, headers, Upstreamed::Stream { resp, permit, idle }));
            }
            // A whole answer: the slot is held until it is read.
            let bytes = b.read_text(resp, &url).await;
            drop(permit);
            Ok((status, content_type, headers, Upstreamed::Whole(bytes?)))
        }
    })
    .await;
    let (status, content_type, headers, opened) = match opened {
        Ok(o) => o,
        Err(e) => {
            if let Some(c) = charge {
                c.release(e.to_string()).await;
            }
            return Err(e);
        }
    };
    let body = match opened {
        Upstreamed::Whole(bytes) => {
            let bytes = match &rename {
                Some(r) => r.apply(&bytes).map_or(bytes, Bytes::from),
                None => bytes,
            };
            let usage = serde_json::from_slice::<UsageCarrier>(&bytes).ok().and_then(|c| c.usage);
            if let Some(c) = charge {
                if c.record.is_some() {
                    let ct = content_type.clone().unwrap_or_else(|| "application/json".into());
                    c.settle_storing(usage, StoredResponse { status, content_type: ct, body: bytes.to_vec() }).await;
                } else {
                    c.settle(usage);
                }
            }
            TextOut::Whole(bytes)
        }
        Upstreamed::Stream { resp, permit, idle } => {
            TextOut::Stream(Relay::new(resp, permit, idle, (strip_usage, rename), charge))
        }
    };
    Ok((status, content_type, headers, body))
}

/// A stream request answered before its working set was ready: the rest of its answer arrives on `answer`; until
/// then the client gets an SSE comment every `every`.
#[derive(Debug)]
pub struct Waiting {
    pub answer: tokio::sync::oneshot::Receiver<Result<Opened, Error>>,
    pub every: Duration,
}

/// For an Idempotency-Key: SHA-256 over the path and the body as sent (a retry sends the same bytes).
fn fingerprint(route: TextRoute, raw: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"POST ");
    h.update(route.path().as_bytes());
    h.update(b"\n");
    h.update(raw);
    h.finalize().into()
}

/// The upstream headers a client's SDK reads: rate limits, retry advice and processing time.
fn passed_headers(headers: &reqwest::header::HeaderMap) -> Vec<(String, Vec<u8>)> {
    headers
        .iter()
        .filter(|(k, _)| {
            let k = k.as_str();
            k.starts_with("x-ratelimit-")
                || matches!(k, "openai-processing-ms" | "retry-after" | "retry-after-ms" | "x-should-retry")
        })
        .map(|(k, v)| (k.as_str().to_owned(), v.as_bytes().to_vec()))
        .collect()
}

enum Upstreamed {
    Whole(Bytes),
    Stream { resp: reqwest::Response, permit: Permit, idle: Duration },
}

fn to_raw(s: &str) -> Result<Box<serde_json::value::RawValue>, Error> {
    serde_json::value::to_raw_value(s).map_err(|e| Error::Internal(format!("encoding the model name: {e}")))
}

/// Tokens a request is assumed to use before its answer says.
#[derive(Debug, Clone, Copy)]
struct Estimate {
    prompt_tokens: u64,
    completion_tokens: u64,
}

/// How a text model is priced.
#[derive(Debug, Clone, Copy)]
enum Pricing {
    PerRequest(Millicredits),
    PerToken(TokenCredits),
}

impl Pricing {
    /// Credits per 1K tokens are millicredits per token; a fraction of a millicredit rounds up.
    fn cost(self, prompt_tokens: u64, completion_tokens: u64) -> Millicredits {
        match self {
            Pricing::PerRequest(mc) => mc,
            Pricing::PerToken(t) => {
                let mc = prompt_tokens as f64 * t.input_per_1k + completion_tokens as f64 * t.output_per_1k;
                (mc - 1e-9).ceil().max(0.0) as Millicredits
            }
        }
    }
}

/// What placing the hold gave.
enum Held {
    /// `None` without keys and without an Idempotency-Key.
    Charge(Option<Charge>),
    /// The Idempotency-Key's stored answer.
    Replay(StoredResponse),
}

/// Holds the estimate (and claims the Idempotency-Key) before any upstream call (402 when the balance is short).
/// Without keys (`auth.mode: none`) nothing is charged; an Idempotency-Key still works, through the ledger's
/// anonymous principal and a free hold.
async fn hold(
    state: &AppState,
    caller: &Caller,
    model: &Arc<ModelConfig>,
    estimate: Estimate,
    claim: Option<IdemClaim>,
) -> Result<Held, Error> {
    let who = match (&caller.principal, &claim) {
        (Some(p), _) => p.clone(),
        (None, Some(_)) => state.ledger.anonymous().await?,
        (None, None) => return Ok(Held::Charge(None)),
    };
    let free = caller.principal.is_none();
    if !who.may_use(&model.id) {
        let allowed = who.allowed_models.as_ref().map(|m| m.join(", ")).unwrap_or_default();
        return Err(Error::ModelNotAllowed { key: who.name.clone(), model: model.id.clone(), allowed });
    }
    let (price_id, unit_mc) = state.prices.get(&model.id).copied().unwrap_or((0, 0));
    let pricing = match model.token_credits {
        _ if free => Pricing::PerRequest(0),
        Some(t) => Pricing::PerToken(t),
        None => Pricing::PerRequest(unit_mc),
    };
    let held_mc = pricing.cost(estimate.prompt_tokens, estimate.completion_tokens);
    let lease = lease(state, model);
    let hold_id = match state.ledger.hold(&who, price_id, 1, held_mc, lease, claim.as_ref()).await? {
        HoldOutcome::Held { hold_id } => hold_id,
        HoldOutcome::Replay { status, content_type, body } => {
            return Ok(Held::Replay(StoredResponse { status, content_type, body }));
        }
    };
    let account = who.account_id;
    let record = claim.map(|c| Box::new((who, c.key)));
    Ok(Held::Charge(Some(Charge { state: state.clone(), hold_id, held_mc, pricing, account, record })))
}

/// How long a text hold may stay open: past the longest a stream may run, so the reaper never takes a live one.
fn lease(state: &AppState, model: &ModelConfig) -> Duration {
    super::dispatch::longest(state, model) + crate::backends::openai_text::STREAM_LIFETIME + Duration::from_secs(60)
}

/// An open hold for one text request, settled exactly once: [`Charge::settle`] captures, [`Charge::release`]
/// returns it, and dropping it unsettled releases it.
#[derive(Debug)]
struct Charge {
    state: AppState,
    hold_id: String,
    held_mc: Millicredits,
    pricing: Pricing,
    account: i64,
    /// Who claimed which Idempotency-Key with this hold.
    record: Option<Box<(Principal, String)>>,
}

impl Charge {
    /// Captures what `usage` says (never more than held); without `usage`, a per-token model is charged the
    /// estimate that was held and a per-request model its price.
    fn settle(mut self, usage: Option<Usage>) {
        let amount = self.amount(usage);
        let (state, hold_id) = (self.state.clone(), std::mem::take(&mut self.hold_id));
        // Balance reads of this account wait for the capture (the client may ask right after the last byte).
        let guard = self.state.settling.begin(self.account);
        spawn(&self.state, async move {
            let _guard = guard;
            if let Err(e) = state.ledger.capture_mc(&hold_id, amount).await {
                tracing::error!(hold = %hold_id, error = %e, "Capturing a hold failed.");
            }
        });
    }

    /// Like [`Charge::settle`], then stores `response` for the Idempotency-Key claimed with the hold, both done
    /// before the answer goes out: a retry that follows the answer finds it stored. This runs in the request's own
    /// task, which a disconnect does not interrupt.
    async fn settle_storing(mut self, usage: Option<Usage>, response: StoredResponse) {
        let amount = self.amount(usage);
        let hold_id = std::mem::take(&mut self.hold_id);
        if let Err(e) = self.state.ledger.capture_mc(&hold_id, amount).await {
            // The hold stays open until the reaper releases it, which also forgets the claim.
            tracing::error!(hold = %hold_id, error = %e, "Capturing a hold failed.");
            return;
        }
        if let Some((who, key)) = self.record.take().map(|r| *r)
            && let Err(e) = self.state.ledger.complete_claim(&who, &key, &response).await
        {
            tracing::error!(hold = %hold_id, error = %e, "Storing the answer for its Idempotency-Key failed.");
        }
    }

    /// What `usage` costs (never more than held); without it, a per-token model is charged the estimate that
    /// was held and a per-request model its price.
    fn amount(&self, usage: Option<Usage>) -> Millicredits {
        match (self.pricing, usage) {
            (Pricing::PerToken(_), Some(u)) => self.pricing.cost(u.prompt_tokens, u.completion_tokens),
            (Pricing::PerToken(_), None) => self.held_mc,
            (Pricing::PerRequest(mc), _) => mc,
        }
        .min(self.held_mc)
    }

    async fn release(mut self, reason: String) {
        let hold_id = std::mem::take(&mut self.hold_id);
        if let Err(e) = self.state.ledger.release(&hold_id, &reason).await {
            tracing::error!(hold = %hold_id, error = %e, "Releasing a hold failed; the reaper releases it when its lease ends.");
        }
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        if self.hold_id.is_empty() {
            return;
        }
        let (state, hold_id) = (self.state.clone(), std::mem::take(&mut self.hold_id));
        let guard = self.state.settling.begin(self.account);
        spawn(&self.state, async move {
            let _guard = guard;
            if let Err(e) = state.ledger.release(&hold_id, "the text answer was not delivered").await {
                tracing::error!(hold = %hold_id, error = %e, "Releasing a hold failed.");
            }
        });
    }
}

fn spawn(state: &AppState, work: impl Future<Output = ()> + Send + 'static) {
    match tokio::runtime::Handle::try_current() {
        Ok(rt) => {
            state.tasks.spawn_on(work, &rt);
        }
        Err(_) => tracing::warn!("No runtime to settle a hold on; the next start releases it."),
    }
}

type Upstream = Pin<Box<dyn Stream<Item = reqwest::Result<Bytes>> + Send>>;

/// An upstream SSE stream relayed to the client as its bytes arrive. Owns the admission slot (released when the
/// stream ends or the relay is dropped — a client that leaves drops it, which closes the upstream connection) and
/// the credit hold. Events are only looked at, never re-encoded; when easel asked for usage itself, the one
/// usage-only event (`"choices": []` with `usage`) is left out, and only complete events are passed on then.
pub struct Relay {
    upstream: Upstream,
    permit: Option<Permit>,
    idle_limit: Duration,
    idle: Pin<Box<tokio::time::Sleep>>,
    strip_usage: bool,
    /// The upstream's model name to show as the client's, when they differ.
    rename: Option<Box<Rename>>,
    /// The unfinished event at the end of what arrived so far.
    pending: BytesMut,
    usage: Option<Usage>,
    charge: Option<Charge>,
    done: bool,
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay").field("strip_usage", &self.strip_usage).field("done", &self.done).finish()
    }
}

impl Relay {
    fn new(
        resp: reqwest::Response,
        permit: Permit,
        idle_limit: Duration,
        (strip, rename): (bool, Option<Rename>),
        charge: Option<Charge>,
    ) -> Self {
        Self {
            upstream: Box::pin(resp.bytes_stream()),
            permit: Some(permit),
            idle_limit,
            idle: Box::pin(tokio::time::sleep(idle_limit)),
            strip_usage: strip,
            rename: rename.map(Box::new),
            pending: BytesMut::new(),
            usage: None,
            charge,
            done: false,
        }
    }

    /// Takes in one upstream chunk; returns the bytes to pass on now. Untouched chunks pass as they came; only
    /// when an event may change (the usage chunk left out, the model renamed) are whole events passed on.
    fn take(&mut self, chunk: Bytes) -> Bytes {
        let rework = self.strip_usage || self.rename.is_some();
        self.pending.extend_from_slice(&chunk);
        let mut out = BytesMut::new();
        while let Some(end) = event_end(&self.pending) {
            let event = self.pending.split_to(end).freeze();
            let usage_only = self.inspect(&event);
            if !(self.strip_usage && usage_only) {
                match self.rename.as_ref().and_then(|r| r.apply(&event)) {
                    Some(renamed) => out.extend_from_slice(&renamed),
                    None => out.extend_from_slice(&event),
                }
            }
        }
        if self.pending.len() > MAX_EVENT_BYTES {
            // Too long to hold back or inspect: pass it on as it is.
            let rest = self.pending.split().freeze();
            if rework {
                out.extend_from_slice(&rest);
            }
        }
        if rework { out.freeze() } else { chunk }
    }

    /// Records the event's `usage`; true when the event is the usage-only chunk.
    fn inspect(&mut self, event: &[u8]) -> bool {
        if find(event, b"\"usage\"").is_none() {
            return false;
        }
        let mut data = Vec::new();
        for line in event.split(|b| *b == b'\n') {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            if let Some(v) = line.strip_prefix(b"data:") {
                if !data.is_empty() {
                    data.push(b'\n');
                }
                data.extend_from_slice(v.strip_prefix(b" ").unwrap_or(v));
            }
        }
        match serde_json::from_slice::<UsageCarrier>(&data) {
            Ok(UsageCarrier { choices, usage: Some(u) }) => {
                self.usage = Some(u);
                choices.is_none_or(|c| c.is_empty())
            }
            _ => false,
        }
    }

    /// The upstream failed after the answer began. Between events the client is told in the stream's own terms
    /// (an `error` event, which OpenAI's SDKs raise); inside an event only a broken connection can say it.
    fn broken(&mut self, why: &str) -> Option<Result<Bytes, std::io::Error>> {
        if !self.pending.is_empty() {
            return Some(Err(std::io::Error::other(why.to_owned())));
        }
        let error = serde_json::json!({"error": {"message": why, "type": "server_error", "param": null, "code": "backend_error"}});
        Some(Ok(Bytes::from(format!("data: {error}\n\n"))))
    }

    /// The stream is over: free the slot and settle.
    fn finish(&mut self, completed: bool) {
        self.done = true;
        self.permit = None;
        if let Some(c) = self.charge.take() {
            match (completed, self.usage) {
                (true, usage) => c.settle(usage),
                (false, Some(u)) => c.settle(Some(u)),
                (false, None) => drop(c),
            }
        }
    }
}

impl Stream for Relay {
    type Item = Result<Bytes, std::io::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if this.done {
            return Poll::Ready(None);
        }
        loop {
            match this.upstream.as_mut().poll_next(cx) {
                Poll::Ready(Some(Ok(chunk))) => {
                    let deadline = tokio::time::Instant::now() + this.idle_limit;
                    this.idle.as_mut().reset(deadline);
                    let out = this.take(chunk);
                    if !out.is_empty() {
                        return Poll::Ready(Some(Ok(out)));
                    }
                }
                Poll::Ready(Some(Err(e))) => {
                    tracing::warn!(error = %e, "The upstream text stream broke.");
                    this.finish(false);
                    return Poll::Ready(this.broken("the backend's stream broke off before its end"));
                }
                Poll::Ready(None) => {
                    let rest = this.pending.split().freeze();
                    this.finish(true);
                    let rework = this.strip_usage || this.rename.is_some();
                    return Poll::Ready((rework && !rest.is_empty()).then_some(Ok(rest)));
                }
                Poll::Pending => {
                    if this.idle.as_mut().poll(cx).is_ready() {
                        tracing::warn!(idle = ?this.idle_limit, "The upstream text stream went silent.");
                        this.finish(false);
                        return Poll::Ready(this.broken("the backend's stream went silent"));
                    }
                    return Poll::Pending;
                }
            }
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        if !self.done {
            self.finish(false);
        }
    }
}

/// Shows the upstream's model name as the one the client asked for: every `"model": "<upstream>"` member of an
/// answer (or of one stream event) becomes `"model": "<asked>"`. Strings inside strings are escaped, so a quoted
/// `"model"` followed by `:` is always a key; nothing else in the bytes changes.
#[derive(Debug, Clone)]
struct Rename {
    /// The upstream's name as a JSON string, quotes included.
    from: Vec<u8>,
    to: Vec<u8>,
}

impl Rename {
    fn new(upstream: &str, asked: &str) -> Option<Self> {
        if upstream == asked {
            return None;
        }
        let from = serde_json::to_vec(upstream).ok()?;
        let to = serde_json::to_vec(asked).ok()?;
        Some(Self { from, to })
    }

    /// The renamed bytes, or `None` when nothing in `src` names the upstream's model.
    fn apply(&self, src: &[u8]) -> Option<Vec<u8>> {
        const KEY: &[u8] = b"\"model\"";
        let mut out: Option<Vec<u8>> = None;
        let mut copied = 0;
        let mut at = 0;
        while let Some(found) = find(&src[at..], KEY) {
            let key = at + found;
            let mut i = key + KEY.len();
            at = i;
            let skip = |i: &mut usize| {
                while src.get(*i).is_some_and(|b| b.is_ascii_whitespace()) {
                    *i += 1;
                }
            };
            skip(&mut i);
            if src.get(i) != Some(&b':') {
                continue;
            }
            i += 1;
            skip(&mut i);
            if !src[i..].starts_with(&self.from) {
                continue;
            }
            let o = out.get_or_insert_with(|| Vec::with_capacity(src.len() + self.to.len()));
            o.extend_from_slice(&src[copied..i]);
            o.extend_from_slice(&self.to);
            copied = i + self.from.len();
            at = copied;
        }
        let mut o = out?;
        o.extend_from_slice(&src[copied..]);
        Some(o)
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Where the first complete SSE event ends (after its blank line: `\n\n` or `\r\n\r\n`).
fn event_end(buf: &[u8]) -> Option<usize> {
    (0..buf.len()).find_map(|i| {
        if buf[i] != b'\n' {
            return None;
        }
        match buf.get(i + 1) {
            Some(b'\n') => Some(i + 2),
            Some(b'\r') if buf.get(i + 2) == Some(&b'\n') => Some(i + 3),
            _ => None,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_end_at_a_blank_line_in_either_line_ending() {
        assert_eq!(event_end(b"data: {}\n\ndata: x"), Some(10));
        assert_eq!(event_end(b"data: {}\r\n\r\ndata"), Some(12));
        assert_eq!(event_end(b"data: {}\n"), None);
    }

    #[test]
    fn the_upstream_model_name_is_shown_as_the_client_asked() {
        let r = Rename::new("up-llm", "gpt-4o").unwrap();
        let event = br#"data: {"id":"c1","model":"up-llm","choices":[{"delta":{"content":"\"model\":\"up-llm\""}}]}"#;
        let renamed = r.apply(event).unwrap();
        assert_eq!(
            String::from_utf8(renamed).unwrap(),
            r#"data: {"id":"c1","model":"gpt-4o","choices":[{"delta":{"content":"\"model\":\"up-llm\""}}]}"#
        );
        // A spaced encoder, and another model's name left alone.
        assert_eq!(r.apply(br#"{"model" : "up-llm"}"#).unwrap(), br#"{"model" : "gpt-4o"}"#.to_vec());
        assert!(r.apply(br#"{"model":"up-llm-2"}"#).is_none());
        assert!(r.apply(br#"{"model":"other"}"#).is_none());
        assert!(Rename::new("same", "same").is_none());
    }

    #[test]
    fn per_token_cost_is_millicredits_per_token_rounded_up() {
        let p = Pricing::PerToken(TokenCredits { input_per_1k: 0.5, output_per_1k: 1.5 });
        assert_eq!(p.cost(10, 20), 35);
        assert_eq!(p.cost(1, 0), 1);
        assert_eq!(Pricing::PerRequest(2000).cost(5, 5), 2000);
    }
}

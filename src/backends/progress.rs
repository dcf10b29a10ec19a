//! The progress sink of one upstream call: adapters report sampler steps and preview images to it; steps feed the
//! job progress metric, and previews (when a streaming client asked for partial images) go to the response.
//! Nothing is decoded, copied or sent when nobody listens.

use std::sync::Mutex;

use bytes::Bytes;
use tokio::sync::mpsc;

use crate::request::ImageFormat;
use crate::telemetry::metrics as m;

/// One preview image a backend sent while working.
#[derive(Debug, Clone)]
pub struct Preview {
    pub bytes: Bytes,
    pub format: ImageFormat,
}

/// Where an upstream call reports how far it is. [`Progress::silent`] only feeds the metric.
#[derive(Debug, Default)]
pub struct Progress {
    listener: Option<Listener>,
}

#[derive(Debug)]
struct Listener {
    tx: mpsc::UnboundedSender<Preview>,
    /// How many previews the client asked for (`partial_images`).
    wanted: u32,
    state: Mutex<Seen>,
}

#[derive(Debug, Default)]
struct Seen {
    sent: u32,
    /// The last reported fraction of the sampler's steps, when the backend says how many there are: previews
    /// come from the sampler, so they are spread over its steps.
    fraction: Option<f64>,
    /// The fraction of the whole run, when the backend tells more than sampler steps (ComfyUI's node events).
    overall: Option<f64>,
}

impl Progress {
    /// A sink nobody reads previews from.
    pub fn silent() -> Self {
        Self::default()
    }

    /// A sink that forwards at most `wanted` previews, spread over the run, to the returned receiver.
    pub fn listening(wanted: u32) -> (Self, mpsc::UnboundedReceiver<Preview>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (Self { listener: Some(Listener { tx, wanted, state: Mutex::default() }) }, rx)
    }

    /// Whether a preview would be used now: adapters skip decoding or painting one when this is false.
    pub fn wants_preview(&self) -> bool {
        self.listener.as_ref().is_some_and(|l| l.state.lock().is_ok_and(|s| l.due(&s)))
    }

    /// `done` of `total` steps (a `total` of 0 means unknown).
    pub fn step(&self, backend: &str, done: f64, total: f64) {
        m::job_progress(backend, done, total);
        if let Some(l) = &self.listener
            && total > 0.0
            && let Ok(mut s) = l.state.lock()
        {
            s.fraction = Some((done / total).clamp(0.0, 1.0));
        }
    }

    /// `done` of `total` units of the whole run (ComfyUI: nodes), for a backend whose sampler steps are only a
    /// part of it. Feeds [`Progress::fraction`], not the spreading of previews.
    pub fn overall(&self, done: f64, total: f64) {
        if let Some(l) = &self.listener
            && total > 0.0
            && let Ok(mut s) = l.state.lock()
        {
            s.overall = Some((done / total).clamp(0.0, 1.0));
        }
    }

    /// How much of the work is done (0–1), when the backend reports it and somebody listens: the whole run's
    /// fraction where the backend tells it, else the sampler's.
    pub fn fraction(&self) -> Option<f64> {
        self.listener.as_ref().and_then(|l| l.state.lock().ok().and_then(|s| s.overall.or(s.fraction)))
    }

    /// A preview of the image being made. Kept when the client still wants one at this point of the run (the
    /// previews asked for are spread evenly over the steps when the backend reports steps).
    pub fn preview(&self, bytes: Bytes, format: ImageFormat) {
        let Some(l) = &self.listener else { return };
        let Ok(mut s) = l.state.lock() else { return };
        if !l.due(&s) {
            return;
        }
        if l.tx.send(Preview { bytes, format }).is_ok() {
            s.sent += 1;
        }
    }
}

impl Listener {
    fn due(&self, s: &Seen) -> bool {
        if s.sent >= self.wanted {
            return false;
        }
        match s.fraction {
            Some(f) => f >= f64::from(s.sent + 1) / f64::from(self.wanted + 1),
            None => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn previews_are_spread_over_the_steps_and_capped() {
        let (p, mut rx) = Progress::listening(2);
        for step in 1..=5u8 {
            p.step("b", f64::from(step), 5.0);
            p.preview(Bytes::from(vec![step]), ImageFormat::Png);
        }
        let got: Vec<u8> = std::iter::from_fn(|| rx.try_recv().ok()).map(|p| p.bytes[0]).collect();
        assert_eq!(got, vec![2, 4]);
        assert!(!Progress::silent().wants_preview());
    }
}

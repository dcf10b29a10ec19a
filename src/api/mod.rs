//! Wire types of the OpenAI-compatible API: serde shapes and body writers, no logic and no I/O.

pub mod chat;
pub mod error;
pub mod files;
pub mod images;
pub mod jobs;
pub mod models;
pub mod videos;

//! Orchestration: one function per operation, each the readable story of a request from validated input to
//! response. Handlers call these and nothing else.

pub mod dispatch;
pub mod image_jobs;
pub mod images;
pub mod outputs;
pub mod routes;
pub mod text;
pub mod videos;

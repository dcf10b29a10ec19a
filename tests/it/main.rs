//! End-to-end tests: easel on 127.0.0.1:0 in front of fake upstreams that speak each native protocol.
//! One test binary (faster to build and link than one per file on a small machine).

// Test helpers outside `#[test]` functions fail loudly too.
#![expect(clippy::unwrap_used, clippy::expect_used, clippy::panic, reason = "tests fail loudly")]

mod support;

mod a1111;
mod admission;
mod cluster;
mod comfyui;
mod comfyui_video;
mod compat;
mod config_cli;
mod connections;
mod deploy;
mod edits;
mod fidelity;
mod fleet;
mod gallery;
mod health;
mod huggingface;
mod image_jobs;
mod images_api;
mod invokeai;
mod ledger;
mod limits;
mod nginx_fleet;
mod observability;
mod openai;
mod outbound;
mod postgres;
mod process;
mod queue_providers;
mod reload;
mod s3;
mod streaming;
mod template;
mod text;
mod tls;
mod trust;
mod ui;
mod unknown_jobs;
mod verify;
mod video_backends;
mod videos;
mod webhooks;
mod working_sets;

//! End-to-end tests: easel on 127.0.0.1:0 in front of fake upstreams that speak each native protocol.
//! One test binary (faster to build and link than one per file on a small machine).

mod support;

mod a1111;
mod config_cli;
mod huggingface;
mod images_api;
mod openai;
mod template;

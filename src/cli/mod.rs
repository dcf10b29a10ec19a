//! The command line: clap types and one function per subcommand, translating flags into library calls.
//! Exit codes: 0 ok, 1 a problem was found, 2 usage error.

mod doctor;
mod keys;
mod serve;
mod verify;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::{self, ProcessEnv};

#[derive(Debug, Parser)]
#[command(
    name = "easel",
    version,
    about = "One OpenAI-compatible gateway for image, video and text generation backends."
)]
pub struct Cli {
    /// Configuration file (default: $EASEL_CONFIG, else ./easel.yaml if present, else a compatibility mode's
    /// environment variables, else the built-in default).
    #[arg(short = 'c', long, env = "EASEL_CONFIG", global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the gateway.
    Serve {
        /// Address to listen on, overriding `server.listen` (e.g. 127.0.0.1:0 for any free port).
        #[arg(long)]
        listen: Option<String>,
    },
    /// Work with configuration files.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Probe every backend, tell what each server really is, and compare with the configuration.
    Doctor,
    /// Manage API keys (works while `easel serve` runs on the same database).
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Manage credits.
    Credits {
        #[command(subcommand)]
        command: CreditsCommand,
    },
    /// Create or upgrade the database schema.
    Migrate,
    /// Check a running gateway from the outside: health, readiness, models, the error shape and, when asked, one
    /// real request per type, the output URL, and the 429 behaviour. Prints a pass/fail table; exit 0 or 1.
    Verify {
        /// The gateway to check.
        #[arg(long, default_value = "http://127.0.0.1:8080")]
        base_url: String,
        /// API key (or the gateway's static bearer token) to send.
        #[arg(long, env = "EASEL_TOKEN")]
        token: Option<String>,
        /// Accept any TLS certificate (a self-signed one on a test box).
        #[arg(long)]
        insecure: bool,
        /// Make one image and fetch its output URL.
        #[arg(long)]
        check_images: bool,
        /// Make one video (waits for the job) and download it.
        #[arg(long)]
        check_videos: bool,
        /// One chat completion, whole and streamed.
        #[arg(long)]
        check_text: bool,
        /// Send N requests at once and check that every refusal is a 429 with Retry-After.
        #[arg(long, value_name = "N")]
        check_429: Option<u32>,
        /// The image model to use (default: the first ready one listed).
        #[arg(long)]
        image_model: Option<String>,
        /// The video model to use (default: the first ready one listed).
        #[arg(long)]
        video_model: Option<String>,
        /// The text model to use (default: the first ready one listed).
        #[arg(long)]
        text_model: Option<String>,
        /// Time limit for each generation, and for a video to finish (e.g. 90s, 10m).
        #[arg(long, default_value = "5m", value_parser = parse_duration)]
        timeout: std::time::Duration,
    },
    /// Print a shell completion script (e.g. `easel completions bash > /etc/bash_completion.d/easel`).
    Completions {
        /// The shell to complete for.
        shell: clap_complete::Shell,
    },
    /// Check the credit ledger.
    Ledger {
        #[command(subcommand)]
        command: LedgerCommand,
    },
}

#[derive(Debug, Subcommand)]
enum KeysCommand {
    /// Create a key; its secret is printed once, alone on the last line.
    Create {
        /// A name for the key (shown in lists, logs and usage).
        #[arg(long)]
        name: String,
        /// Credits to start with.
        #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
        credits: f64,
        /// Comma-separated model ids this key may use (default: all).
        #[arg(long, value_delimiter = ',')]
        models: Option<Vec<String>>,
        /// This key's requests per minute: a whole number >= 1 or `unlimited` (default: `auth.key_limits`).
        #[arg(long, value_parser = crate::ledger::Limit::parse)]
        rpm: Option<crate::ledger::Limit>,
        /// This key's requests in flight at once: a whole number >= 1 or `unlimited` (default: `auth.key_limits`).
        #[arg(long, value_parser = crate::ledger::Limit::parse)]
        max_parallel: Option<crate::ledger::Limit>,
    },
    /// List keys with their balances and limits.
    List,
    /// Change a key's own limits: a whole number >= 1, `unlimited`, or `default` (back to `auth.key_limits`).
    Limits {
        /// The key's name, id or prefix.
        key: String,
        /// Requests per minute.
        #[arg(long, value_parser = crate::ledger::Limit::parse)]
        rpm: Option<crate::ledger::Limit>,
        /// Requests in flight at once.
        #[arg(long, value_parser = crate::ledger::Limit::parse)]
        max_parallel: Option<crate::ledger::Limit>,
    },
    /// Revoke a key (by name, id or prefix).
    Revoke {
        /// The key's name, id or prefix.
        key: String,
    },
}

#[derive(Debug, Subcommand)]
enum CreditsCommand {
    /// Add credits to a key (negative to take back).
    Grant {
        /// The key's name, id or prefix.
        key: String,
        /// Credits to add (negative to take back).
        #[arg(allow_negative_numbers = true)]
        credits: f64,
    },
}

#[derive(Debug, Subcommand)]
enum LedgerCommand {
    /// Verify the ledger invariants; exit 1 on drift.
    Check,
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Validate a configuration (no network): print every problem and exit 1, or a summary and exit 0.
    Check,
}

/// Parses the command line and runs it.
pub fn run() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    let config = cli.config;
    match cli.command {
        Command::Serve { listen } => serve::run(config, listen),
        Command::Config { command: ConfigCommand::Check } => check(config),
        Command::Keys { command } => keys::run(
            config,
            match command {
                KeysCommand::Create { name, credits, models, rpm, max_parallel } => keys::Action::Create {
                    name,
                    credits,
                    models,
                    limits: crate::ledger::KeyOverrides {
                        requests_per_minute: rpm.unwrap_or_default(),
                        max_parallel: max_parallel.unwrap_or_default(),
                    },
                },
                KeysCommand::List => keys::Action::List,
                KeysCommand::Limits { key, rpm, max_parallel } => keys::Action::Limits {
                    key,
                    change: crate::ledger::KeyLimitsChange { requests_per_minute: rpm, max_parallel },
                },
                KeysCommand::Revoke { key } => keys::Action::Revoke { key },
            },
        ),
        Command::Credits { command: CreditsCommand::Grant { key, credits } } => {
            keys::run(config, keys::Action::Grant { key, credits })
        }
        Command::Doctor => doctor::run(config),
        Command::Migrate => keys::run(config, keys::Action::Migrate),
        Command::Ledger { command: LedgerCommand::Check } => keys::run(config, keys::Action::Check),
        Command::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            let mut out = Vec::new();
            clap_complete::generate(shell, &mut cmd, "easel", &mut out);
            write_stdout(&String::from_utf8_lossy(&out));
            ExitCode::SUCCESS
        }
        Command::Verify {
            base_url,
            token,
            insecure,
            check_images,
            check_videos,
            check_text,
            check_429,
            image_model,
            video_model,
            text_model,
            timeout,
        } => verify::run(verify::Options {
            base_url,
            token,
            insecure,
            images: check_images,
            videos: check_videos,
            text: check_text,
            burst: check_429,
            image_model,
            video_model,
            text_model,
            timeout,
        }),
    }
}

fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("`{s}` is not a duration (e.g. 90s, 10m): {e}"))
}

fn check(path: Option<PathBuf>) -> ExitCode {
    let path = config::resolve_path(path.as_deref());
    match config::load(path.as_deref(), &ProcessEnv) {
        Ok(cfg) => {
            let mut out =
                format!("{}: ok\n  listen: {}\n  backends ({}):\n", cfg.origin, cfg.server.listen, cfg.backends.len());
            for b in &cfg.backends {
                let url = b.url.as_ref().map_or_else(|| "(built in)".to_owned(), ToString::to_string);
                out.push_str(&format!(
                    "    {} [{}] {} images={}\n",
                    b.name,
                    b.kind,
                    url,
                    b.limit(config::Capability::Images)
                ));
            }
            out.push_str(&format!("  models ({}):\n", cfg.models.len()));
            for m in &cfg.models {
                let names: Vec<&str> = m.backends.iter().map(|b| b.name.as_str()).collect();
                out.push_str(&format!("    {} ({}) -> {}\n", m.id, m.kind.as_str(), names.join(", ")));
            }
            if cfg.origin.starts_with("seed-")
                && let Some(text) = config::compat_text(&ProcessEnv)
            {
                out.push_str(&format!("  compatibility mode; the configuration it stands for:\n{text}"));
            }
            if !cfg.routes.is_empty() {
                out.push_str(&format!("  routes ({}):\n", cfg.routes.len()));
                for r in &cfg.routes {
                    out.push_str(&format!("    POST {} -> {}\n", r.path, r.model));
                }
            }
            write_stdout(&out);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::from(1)
        }
    }
}

/// The CLI's one way to print results (the library never prints).
fn write_stdout(s: &str) {
    use std::io::Write;
    let _ = std::io::stdout().lock().write_all(s.as_bytes());
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn every_flag_and_subcommand_has_help() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for arg in cmd.get_arguments() {
                let id = arg.get_id().as_str();
                if id != "help" && id != "version" && arg.get_help().is_none() {
                    missing.push(format!("{path} --{id}"));
                }
            }
            for sub in cmd.get_subcommands() {
                if sub.get_about().is_none() {
                    missing.push(format!("{path} {}", sub.get_name()));
                }
                walk(sub, &format!("{path} {}", sub.get_name()), missing);
            }
        }
        let mut missing = Vec::new();
        walk(&super::Cli::command(), "easel", &mut missing);
        assert!(missing.is_empty(), "no help text: {missing:?}");
    }
}

//! The command line: clap types and one function per subcommand, translating flags into library calls.
//! Exit codes: 0 ok, 1 a problem was found, 2 usage error.

mod serve;

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
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the gateway.
    Serve {
        /// Configuration file (default: ./easel.yaml if present, else the built-in default).
        #[arg(long, env = "EASEL_CONFIG")]
        config: Option<PathBuf>,
        /// Address to listen on, overriding `server.listen` (e.g. 127.0.0.1:0 for any free port).
        #[arg(long)]
        listen: Option<String>,
    },
    /// Work with configuration files.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Validate a configuration (no network): print every problem and exit 1, or a summary and exit 0.
    Check {
        #[arg(long, env = "EASEL_CONFIG")]
        config: Option<PathBuf>,
    },
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
    match cli.command {
        Command::Serve { config, listen } => serve::run(config, listen),
        Command::Config { command: ConfigCommand::Check { config } } => check(config),
    }
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

//! `easel keys …`, `easel credits grant`, `easel migrate`, `easel ledger check`: the ledger from the command line.
//! They open the configured database beside a running server (SQLite's own locking, or PostgreSQL's transactions,
//! keep them consistent).

use std::path::PathBuf;
use std::process::ExitCode;

use crate::config::{self, ProcessEnv};
use crate::ledger::{AnyStore, KeyInfo, KeyLimitsChange, KeyOverrides, LedgerError, Store, fmt_credits, to_mc};

/// What to do with the ledger.
#[derive(Debug)]
pub enum Action {
    Create { name: String, credits: f64, models: Option<Vec<String>>, limits: KeyOverrides },
    List,
    Limits { key: String, change: KeyLimitsChange },
    Revoke { key: String },
    Grant { key: String, credits: f64 },
    Migrate,
    Check,
}

pub fn run(config_path: Option<PathBuf>, action: Action) -> ExitCode {
    let path = config::resolve_path(config_path.as_deref());
    let cfg = match config::load(path.as_deref(), &ProcessEnv) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(1);
        }
    };
    if let Err(why) = check_amounts(&action) {
        eprintln!("{why}");
        return ExitCode::from(2);
    }
    // A key limited to a model that does not exist would be refused everywhere: say so now.
    if let Action::Create { models: Some(models), .. } = &action {
        let ids: Vec<String> = cfg.models.iter().map(|m| m.id.clone()).collect();
        let unknown: Vec<String> = models
            .iter()
            .filter(|m| !ids.contains(m))
            .map(|m| match crate::routing::nearest(m, &ids) {
                Some(n) => format!("`{m}` (did you mean `{n}`?)"),
                None => format!("`{m}`"),
            })
            .collect();
        if !unknown.is_empty() {
            eprintln!("--models: no model {} in {}; defined: {}", unknown.join(", "), cfg.origin, ids.join(", "));
            return ExitCode::from(2);
        }
    }
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(act(&cfg.storage.database, action)) {
        Ok((out, code)) => {
            super::write_stdout(&out);
            code
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::from(1)
        }
    }
}

/// Names and amounts the ledger can take exactly: a name, finite credits with at most three decimals (the
/// ledger counts millicredits), none negative at creation, a grant that changes something.
fn check_amounts(action: &Action) -> Result<(), String> {
    let exact = |what: &str, c: f64| {
        if !c.is_finite() || c.abs() > 1e12 {
            return Err(format!("{what}: `{c}` is not an amount of credits"));
        }
        if ((c * 1000.0).round() - c * 1000.0).abs() > 1e-6 {
            return Err(format!("{what}: `{c}` has more than 3 decimals; the ledger counts thousandths of a credit"));
        }
        Ok(())
    };
    match action {
        Action::Create { name, credits, .. } => {
            if name.trim().is_empty() {
                return Err("--name must not be empty".into());
            }
            exact("--credits", *credits)?;
            if *credits < 0.0 {
                return Err("--credits must not be negative".into());
            }
        }
        Action::Limits { change, .. } if change.is_empty() => {
            return Err(
                "keys limits: give --rpm and/or --max-parallel (a whole number >= 1, `unlimited` or `default`)".into(),
            );
        }
        Action::Grant { credits, .. } => {
            exact("credits", *credits)?;
            if to_mc(*credits) == 0 {
                return Err("credits: a grant of 0 changes nothing".into());
            }
        }
        _ => {}
    }
    Ok(())
}

const LIST_HEADER: &str = "  id  name                 prefix           state    available balance  held      models  (limits: rpm, parallel)\n";

fn line(k: &KeyInfo) -> String {
    let models = k.allowed_models.as_ref().map_or_else(|| "all models".to_owned(), |m| m.join(","));
    let state = if k.revoked { "revoked" } else { "active" };
    format!(
        "{:>4}  {:<20} {:<16} {:<8} available {:>10}  held {:>8}  {models}  rpm {}  parallel {}\n",
        k.id,
        k.name,
        k.prefix,
        state,
        fmt_credits(k.available_mc),
        fmt_credits(k.held_mc),
        k.limits.requests_per_minute,
        k.limits.max_parallel
    )
}

async fn act(database: &str, action: Action) -> Result<(String, ExitCode), LedgerError> {
    let store = AnyStore::open(database, false).await?;
    Ok(match action {
        Action::Create { name, credits, models, limits } => {
            let new = store.create_key(&name, to_mc(credits), models.as_deref(), limits).await?;
            // The secret is alone on the last line, for scripts: `easel keys create --name x | tail -1`.
            (
                format!(
                    "created key {} ({}) with {} credits; the secret is shown once:\n{}\n",
                    new.info.name,
                    new.info.prefix,
                    fmt_credits(new.info.available_mc),
                    new.secret
                ),
                ExitCode::SUCCESS,
            )
        }
        Action::List => {
            let keys = store.list_keys().await?;
            if keys.is_empty() {
                ("no keys (create one with `easel keys create --name NAME`)\n".to_owned(), ExitCode::SUCCESS)
            } else {
                (std::iter::once(LIST_HEADER.to_owned()).chain(keys.iter().map(line)).collect(), ExitCode::SUCCESS)
            }
        }
        Action::Revoke { key } => {
            // The same match the ledger uses (name, id or prefix): a key revoked before is said to be, exit 1.
            let before = store.list_keys().await?;
            let already = before.iter().find(|k| k.name == key || k.id.to_string() == key || k.prefix == key);
            match already {
                Some(k) if k.revoked => (format!("already revoked: {}", line(k)), ExitCode::from(1)),
                _ => (format!("revoked: {}", line(&store.revoke_key(&key).await?)), ExitCode::SUCCESS),
            }
        }
        Action::Limits { key, change } => {
            (format!("limits set: {}", line(&store.set_key_limits(&key, change).await?)), ExitCode::SUCCESS)
        }
        Action::Grant { key, credits } => (line(&store.grant(&key, to_mc(credits), "cli").await?), ExitCode::SUCCESS),
        Action::Migrate => (format!("{}: migrations applied\n", store.describe()), ExitCode::SUCCESS),
        Action::Check => {
            let drift = store.check().await?;
            if drift.is_empty() {
                (format!("{}: ledger clean\n", store.describe()), ExitCode::SUCCESS)
            } else {
                let text: String = drift.iter().map(|d| format!("drift: {}: {}\n", d.account, d.problem)).collect();
                (text, ExitCode::from(1))
            }
        }
    })
}

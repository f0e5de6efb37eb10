//! `tiercast token`: mint a user or publisher token with the configured
//! secret.

use std::process::ExitCode;

use clap::Args;
use tiercast_engine::auth::now_unix;

use super::serve::{ConfigArgs, load_config};
use crate::usage;

#[derive(Args)]
pub struct TokenArgs {
    /// The user id the token is for.
    #[arg(long, required_unless_present = "publisher")]
    user: Option<u64>,
    /// Mint a publisher token for the HTTP API instead.
    #[arg(long)]
    publisher: bool,
    /// Validity in seconds.
    #[arg(long, default_value_t = 24 * 3600)]
    ttl: u64,
    #[command(flatten)]
    settings: ConfigArgs,
}

pub fn run(a: TokenArgs) -> anyhow::Result<ExitCode> {
    let cfg = load_config(&a.settings, false)?;
    let keys = cfg.token_keys();
    let now = now_unix();
    if a.ttl == 0 || a.ttl > cfg.auth.max_token_lifetime_s {
        return Err(usage(format!(
            "--ttl must be 1..={} (auth.max_token_lifetime_s)",
            cfg.auth.max_token_lifetime_s
        )));
    }
    let t = match (a.publisher, a.user) {
        (true, _) => keys.mint_publisher("cli", now, a.ttl),
        (false, Some(0)) => return Err(usage("--user must be non-zero")),
        (false, Some(user)) => keys.mint_user(user, now, a.ttl),
        (false, None) => return Err(usage("--user or --publisher is required")),
    };
    println!("{t}");
    Ok(ExitCode::SUCCESS)
}

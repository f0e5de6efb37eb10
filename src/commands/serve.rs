//! `tiercast dev`, `tiercast engine` and `tiercast edge`: load the
//! configuration once, start the server the role names, print where it
//! serves (and, with `--ready-json`, one JSON line for programs), run until
//! Ctrl-C or SIGTERM, then drain.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use tiercast_edge::node::write_private;
use tiercast_edge::{Config, EngineService, Node};
use tiercast_engine::auth::now_unix;

use crate::{shutdown_signal, usage};

/// Where a command's settings come from.
#[derive(Args)]
pub struct ConfigArgs {
    /// A TOML configuration file ([node], [engine], [edge] sections).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Override a setting: `--set edge.listen=127.0.0.1:7443` (repeatable).
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    pub set: Vec<String>,
}

#[derive(Args)]
pub struct NodeArgs {
    #[command(flatten)]
    pub settings: ConfigArgs,
    /// Also print one JSON line once serving, for programs that start the
    /// server: `{"ready":{"role":..,"quic":..,"http":..,"node_id":..,"certificate":..}}`.
    #[arg(long)]
    pub ready_json: bool,
}

/// Which server a command runs.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Edge and engine in one process, embedded store, a development secret
    /// if none is configured.
    Dev,
    /// The publisher API and the shared store; no QUIC.
    Engine,
    /// QUIC for devices, with the engine's store (`node.store_url`).
    Edge,
}

impl Role {
    fn name(self) -> &'static str {
        match self {
            Role::Dev => "dev",
            Role::Engine => "engine",
            Role::Edge => "edge",
        }
    }
}

/// The running server of a role.
enum Server {
    Node(Node),
    Engine(EngineService),
}

impl Server {
    fn quic_addr(&self) -> Option<std::net::SocketAddr> {
        match self {
            Server::Node(n) => Some(n.quic_addr),
            Server::Engine(_) => None,
        }
    }

    fn http_addr(&self) -> std::net::SocketAddr {
        match self {
            Server::Node(n) => n.http_addr,
            Server::Engine(e) => e.http_addr,
        }
    }

    fn node_id(&self) -> u16 {
        match self {
            Server::Node(n) => n.node_id(),
            Server::Engine(e) => e.engine.node_id(),
        }
    }

    fn cert_path(&self) -> Option<&Path> {
        match self {
            Server::Node(n) => n.cert_path.as_deref(),
            Server::Engine(_) => None,
        }
    }

    async fn shutdown(self) {
        match self {
            Server::Node(n) => n.shutdown().await,
            Server::Engine(e) => e.shutdown().await,
        }
    }
}

pub async fn run(role: Role, a: NodeArgs) -> anyhow::Result<ExitCode> {
    let cfg = load_config(&a.settings, role == Role::Dev)?;
    if role == Role::Edge && cfg.node.store_url.is_none() {
        eprintln!("tiercast edge: no node.store_url; using an embedded store of its own");
    }
    let server = match role {
        Role::Engine => Server::Engine(EngineService::start(cfg.clone()).await?),
        Role::Dev | Role::Edge => Server::Node(Node::start(cfg.clone()).await?),
    };
    let name = role.name();
    match role {
        Role::Dev => println!("tiercast dev node running"),
        Role::Engine | Role::Edge => println!("tiercast {name} running"),
    }
    if let Some(quic) = server.quic_addr() {
        println!("  QUIC edge:    {quic}");
    }
    println!("  HTTP API:     http://{}", server.http_addr());
    match role {
        Role::Dev => println!("  data:         {}", cfg.node.data_dir.display()),
        Role::Engine | Role::Edge => println!("  node id:      {}", server.node_id()),
    }
    if let Some(p) = server.cert_path() {
        println!(
            "  certificate:  {} (self-signed; clients pass --ca)",
            p.display()
        );
    }
    match (&server, role) {
        (Server::Node(node), Role::Dev) => {
            let now = now_unix();
            println!("  token user 1: {}", node.keys.mint_user(1, now, 24 * 3600));
            println!(
                "  publisher:    {}",
                node.keys.mint_publisher("dev", now, 24 * 3600)
            );
            println!("more tokens: tiercast token --user ID   (Ctrl-C stops the node)");
        }
        (Server::Engine(_), _) => println!(
            "  edges use:    --set node.store_url=http://{}",
            server.http_addr()
        ),
        _ => {}
    }
    if a.ready_json {
        let line = serde_json::json!({"ready": {
            "role": name,
            "quic": server.quic_addr().map(|q| q.to_string()),
            "http": format!("http://{}", server.http_addr()),
            "node_id": server.node_id(),
            "certificate": server.cert_path().map(|p| p.display().to_string()),
        }});
        println!("{line}");
    }
    let _ = std::io::Write::flush(&mut std::io::stdout());
    shutdown_signal().await;
    eprintln!("tiercast {name}: shutting down");
    server.shutdown().await;
    Ok(ExitCode::SUCCESS)
}

fn parse_sets(sets: &[String]) -> anyhow::Result<Vec<(String, String)>> {
    sets.iter()
        .map(|s| {
            s.split_once('=')
                .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
                .ok_or_else(|| usage(format!("--set {s}: expected SECTION.KEY=VALUE")))
        })
        .collect()
}

/// The development secret's file in a data directory (`listen --user`
/// reads it too).
pub const DEV_SECRET_FILE: &str = "dev-secret";

/// The configuration of a server, loaded once: file, then
/// `TIERCAST_SECTION__KEY` variables, then `--set`. Only `tiercast dev`
/// (`dev_secret`) falls back to a development secret, created once in the
/// data directory, readable by its owner only; every other command needs a
/// configured secret and says so in one line.
pub fn load_config(a: &ConfigArgs, dev_secret: bool) -> anyhow::Result<Config> {
    let overrides = parse_sets(&a.set)?;
    let mut cfg = Config::merged(a.config.as_deref(), std::env::vars(), &overrides)
        .map_err(|e| usage(e.to_string()))?;
    if dev_secret && cfg.node.token_secret.is_empty() {
        cfg.node.token_secret = development_secret(&cfg.node.data_dir)?;
    }
    cfg.validate().map_err(|e| usage(e.to_string()))?;
    Ok(cfg)
}

/// The development secret kept in `data_dir`, created on first use.
fn development_secret(data_dir: &Path) -> anyhow::Result<String> {
    let path = data_dir.join(DEV_SECRET_FILE);
    if let Ok(s) = std::fs::read_to_string(&path) {
        return Ok(s.trim().to_owned());
    }
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("creating {}", data_dir.display()))?;
    let s: String = (0..48)
        .map(|_| char::from(b'a' + rand::random_range(0..26u8)))
        .collect();
    write_private(&path, s.as_bytes()).with_context(|| format!("writing {}", path.display()))?;
    Ok(s)
}

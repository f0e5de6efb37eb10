//! What `tiercast listen` and `tiercast send` share: connecting as a device
//! by hand. The device id the edge issues is kept in the data directory, so
//! `listen` and `send` are two devices of the user and a repeated run is the
//! same device.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use clap::Args;
use tiercast_client::{Client, ClientConfig};
use tiercast_engine::auth::{TokenKeys, now_unix};

use tiercast_edge::node::write_private;

use super::serve::DEV_SECRET_FILE;
use crate::usage;

#[derive(Args)]
pub struct DeviceArgs {
    /// The edge's QUIC address.
    #[arg(long, default_value = "127.0.0.1:7443")]
    addr: SocketAddr,
    /// A token (`tiercast token --user ID`); or give --user to mint one from
    /// the development secret in --data-dir.
    #[arg(long, env = "TIERCAST_TOKEN")]
    token: Option<String>,
    #[arg(long)]
    user: Option<u64>,
    /// This device's id (non-zero; keep it across runs).
    #[arg(long)]
    client_id: Option<u64>,
    /// Certificate to trust (PEM); `tiercast dev` writes its own here.
    #[arg(long)]
    ca: Option<PathBuf>,
    /// Where `tiercast dev` keeps its data (development secret, certificate).
    #[arg(long, default_value = "tiercast-data")]
    data_dir: PathBuf,
    #[arg(long, default_value = "localhost")]
    server_name: String,
}

/// Which of the user's two command-line devices this is.
#[derive(Clone, Copy)]
pub enum Role {
    Listen,
    Send,
}

impl Role {
    fn name(self) -> &'static str {
        match self {
            Role::Listen => "listen",
            Role::Send => "send",
        }
    }
}

/// Where the CLI keeps the device id the edge issued to (user, role), so
/// `listen` and `send` are two devices of the user and a repeated run is
/// the same device.
fn device_id_file(data_dir: &Path, user: u64, role: Role) -> std::path::PathBuf {
    let name = role.name();
    data_dir
        .join("devices")
        .join(format!("user-{user}-{name}.id"))
}

fn read_device_id(path: &Path) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Keeps an issued device id (owner-only: it is the user's device).
fn write_device_id(path: &Path, id: u64) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    write_private(path, id.to_string().as_bytes())
}

pub async fn connect(
    a: &DeviceArgs,
    role: Role,
) -> anyhow::Result<(Client, tiercast_client::Deliveries)> {
    let (token, user) = match (&a.token, a.user) {
        (Some(t), _) => (t.clone(), a.user),
        (None, Some(user)) => {
            let path = a.data_dir.join(DEV_SECRET_FILE);
            let secret = std::fs::read_to_string(&path).map_err(|_| {
                usage(format!(
                    "--user needs the development secret at {} (run `tiercast dev`), or pass --token",
                    path.display()
                ))
            })?;
            (
                TokenKeys::new(secret.trim().as_bytes()).mint_user(user, now_unix(), 3600),
                Some(user),
            )
        }
        (None, None) => {
            return Err(usage(
                "give --token, or --user with a `tiercast dev` data dir",
            ));
        }
    };
    // The device id: given, kept from an earlier run, or issued now (0).
    let kept = user.map(|u| device_id_file(&a.data_dir, u, role));
    let client_id = match a.client_id {
        Some(0) => return Err(usage("--client-id must be non-zero")),
        Some(c) => c,
        None => kept.as_deref().and_then(read_device_id).unwrap_or(0),
    };
    let ca =
        a.ca.clone()
            .unwrap_or_else(|| a.data_dir.join("dev-cert.pem"));
    let pem = read_ca(&ca)?;
    let mut cfg = ClientConfig::new(a.addr, pem, token, client_id);
    cfg.server_name = a.server_name.clone();
    cfg.device = format!("cli-{}", role.name());
    let connected = match Client::connect(cfg.clone()).await {
        // A kept id the edge no longer knows (the device expired): a new
        // device.
        Err(e)
            if a.client_id.is_none()
                && client_id != 0
                && e.code() == Some(tiercast_schemas::wire::ErrorCode::UnknownDevice) =>
        {
            cfg.client_id = 0;
            Client::connect(cfg).await
        }
        other => other,
    };
    let (client, rx) = connected.map_err(|e| anyhow::anyhow!("{e}"))?;
    let path = device_id_file(&a.data_dir, client.user_id, role);
    if a.client_id.is_none()
        && let Err(e) = write_device_id(&path, client.client_id)
    {
        eprintln!("note: cannot keep the device id in {}: {e}", path.display());
    }
    Ok((client, rx))
}

fn read_ca(path: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path).map_err(|e| {
        usage(format!(
            "cannot read certificate {}: {e} (pass --ca)",
            path.display()
        ))
    })
}

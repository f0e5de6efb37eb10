//! `tiercast listen` and `tiercast send`: a device by hand. The device id
//! the edge issues is kept in the data directory, so `listen` and `send`
//! are two devices of the user and a repeated run is the same device.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use bytes::Bytes;
use clap::Args;
use tiercast_client::{Client, ClientConfig, Delivery};
use tiercast_engine::auth::{TokenKeys, now_unix};

use super::serve::{DEV_SECRET_FILE, write_private};
use crate::{shutdown_signal, usage};

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

#[derive(Args)]
pub struct SendArgs {
    #[command(flatten)]
    device: DeviceArgs,
    #[arg(long)]
    conversation: u64,
    /// The message; without it, each line of stdin is sent.
    text: Option<String>,
}

/// Where the CLI keeps the device id the edge issued to (user, role), so
/// `listen` and `send` are two devices of the user and a repeated run is
/// the same device.
fn device_id_file(data_dir: &Path, user: u64, role: u64) -> std::path::PathBuf {
    let name = if role == 1 { "listen" } else { "send" };
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

async fn connect(
    a: &DeviceArgs,
    role: u64,
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
    cfg.device = format!("cli-{}", if role == 1 { "listen" } else { "send" });
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

pub async fn listen(a: DeviceArgs) -> anyhow::Result<ExitCode> {
    let (client, mut rx) = connect(&a, 1).await?;
    eprintln!(
        "listening as user {} (device {}); Ctrl-C to stop",
        client.user_id, client.client_id
    );
    let mut last_notified: std::collections::HashMap<u64, u64> = Default::default();
    loop {
        let d = tokio::select! {
            d = rx.recv() => d,
            _ = shutdown_signal() => break,
        };
        match d {
            Some(Delivery::Message(m)) => {
                print_message(&m);
                // Tier-1 messages wait in this device's inbox until acked;
                // acking a tier-2 or tier-3 id removes nothing, and is fine.
                client
                    .ack(&[m.id])
                    .await
                    .map_err(|e| anyhow::anyhow!("ack: {e}"))?;
            }
            Some(Delivery::Notify {
                conversation,
                message_id,
            }) => {
                // Tier 3: the notification names the newest message (it
                // may stand for several); show those not shown yet.
                let shown = *last_notified.get(&conversation).unwrap_or(&0);
                if message_id <= shown {
                    continue;
                }
                let mut new = if shown == 0 {
                    client
                        .pull(conversation, message_id)
                        .await
                        .map_err(|e| anyhow::anyhow!("pull: {e}"))?
                        .into_iter()
                        .collect()
                } else {
                    let (page, _) = client
                        .fetch(conversation, message_id + 1, 100)
                        .await
                        .map_err(|e| anyhow::anyhow!("fetch: {e}"))?;
                    page.into_iter()
                        .filter(|m| m.id > shown)
                        .collect::<Vec<_>>()
                };
                new.sort_by_key(|m| m.id);
                new.iter().for_each(print_message);
                last_notified.insert(conversation, message_id);
            }
            Some(other) => println!("{other:?}"),
            None => {
                let why = client.closed().await;
                return Err(anyhow::anyhow!("disconnected: {why}"));
            }
        }
    }
    client.shutdown().await;
    Ok(ExitCode::SUCCESS)
}

fn print_message(m: &tiercast_schemas::wire::Message) {
    println!(
        "[conversation {}] user {}: {}  (id {})",
        m.conversation,
        m.sender,
        String::from_utf8_lossy(&m.body),
        m.id
    );
    let _ = std::io::stdout().flush();
}

pub async fn send(a: SendArgs) -> anyhow::Result<ExitCode> {
    let (client, _rx) = connect(&a.device, 2).await?;
    let base = rand::random::<u64>() >> 16;
    let lines: Vec<String> = match a.text {
        Some(t) => vec![t],
        None => std::io::stdin().lines().collect::<Result<_, _>>()?,
    };
    for (i, line) in lines.into_iter().enumerate() {
        let ok = client
            .send(a.conversation, base + i as u64 + 1, Bytes::from(line))
            .await
            .map_err(|e| anyhow::anyhow!("send: {e}"))?;
        println!("sent {} to conversation {}", ok.message_id, ok.conversation);
    }
    client.shutdown().await;
    Ok(ExitCode::SUCCESS)
}

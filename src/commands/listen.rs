//! `tiercast listen`: connect as a device and print every message it
//! receives (tier 3: pulling the bodies a notification stands for).

use std::io::Write;
use std::process::ExitCode;

use tiercast_client::Delivery;

use super::device::{DeviceArgs, Role, connect};
use crate::shutdown_signal;

pub async fn run(a: DeviceArgs) -> anyhow::Result<ExitCode> {
    let (client, mut rx) = connect(&a, Role::Listen).await?;
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
                    client
                        .pull_since(conversation, shown, message_id)
                        .await
                        .map_err(|e| anyhow::anyhow!("fetch: {e}"))?
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

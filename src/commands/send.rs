//! `tiercast send`: connect as a device and send a message, or each line
//! of stdin.

use std::process::ExitCode;

use bytes::Bytes;
use clap::Args;

use super::device::{DeviceArgs, Role, connect};

#[derive(Args)]
pub struct SendArgs {
    #[command(flatten)]
    device: DeviceArgs,
    #[arg(long)]
    conversation: u64,
    /// The message; without it, each line of stdin is sent.
    text: Option<String>,
}

pub async fn run(a: SendArgs) -> anyhow::Result<ExitCode> {
    let (client, _rx) = connect(&a.device, Role::Send).await?;
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

//! `tiercast demo`: a single node in-process, simulated devices over QUIC
//! on loopback, a delivery report per tier.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use tiercast_loadgen::demo::{self, DemoOptions};

use crate::{usage, write_json};

#[derive(Args)]
pub struct DemoArgs {
    /// Users, each with --devices devices.
    #[arg(long, default_value_t = 8)]
    users: u64,
    #[arg(long, default_value_t = 2)]
    devices: u64,
    /// Chats (tier 1).
    #[arg(long, default_value_t = 4)]
    chats: u64,
    /// Members per chat.
    #[arg(long, default_value_t = 3)]
    chat_size: u64,
    /// Messages each sender sends into each of its chats and the group;
    /// the backend publishes as many into the channel.
    #[arg(long, default_value_t = 20)]
    messages: u64,
    /// Body size in bytes.
    #[arg(long, default_value_t = 64)]
    payload: usize,
    /// The tiers to show: 1 (chats), 2 (a group of every user), 3 (a
    /// channel, mostly offline subscribers).
    #[arg(long, value_delimiter = ',', default_value = "1,2,3")]
    tiers: Vec<u8>,
    /// Members of the channel (0: four times the group); every user is
    /// online, the rest are not.
    #[arg(long, default_value_t = 0)]
    channel_size: u64,
    /// Write the figures as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

pub async fn run(a: DemoArgs) -> anyhow::Result<ExitCode> {
    let opts = DemoOptions {
        users: a.users,
        devices: a.devices,
        chats: a.chats,
        chat_size: a.chat_size,
        messages: a.messages,
        payload: a.payload,
        tiers: a.tiers,
        channel_size: a.channel_size,
        ..DemoOptions::default()
    };
    opts.validate().map_err(usage)?;
    println!(
        "tiercast demo: {} users x {} devices, {} chats of {}, a group of {}, a channel of {}; {} messages per sender per conversation, {}-byte bodies",
        opts.users,
        opts.devices,
        opts.chats,
        opts.chat_size,
        opts.group_size(),
        opts.channel_size(),
        opts.messages,
        opts.payload
    );
    let (sharded_above, id_only_above) = opts.thresholds();
    println!(
        "single node in-process: embedded store, in-process backplane, QUIC on loopback; tier thresholds lowered to the demo's sizes (tier 2 above {sharded_above} members, tier 3 above {id_only_above})\n"
    );
    let run = demo::run(opts).await?;
    print!("{}", run.report.render());
    if let Some(path) = a.json {
        write_json(&path, &run.report)?;
    }
    Ok(if run.report.ok() {
        ExitCode::SUCCESS
    } else {
        eprintln!("tiercast demo: {} deliveries lost", run.report.total.lost);
        ExitCode::FAILURE
    })
}

//! `tiercast demo`: a single node in-process, simulated devices over QUIC
//! on loopback, a delivery report.

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
    #[arg(long, default_value_t = 4)]
    chats: u64,
    /// Members per chat.
    #[arg(long, default_value_t = 3)]
    chat_size: u64,
    /// Messages each sender sends into each of its chats.
    #[arg(long, default_value_t = 20)]
    messages: u64,
    /// Body size in bytes.
    #[arg(long, default_value_t = 64)]
    payload: usize,
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
        ..DemoOptions::default()
    };
    opts.validate().map_err(usage)?;
    println!(
        "tiercast demo: {} users x {} devices, {} chats of {}, {} messages per sender per chat, {}-byte bodies",
        opts.users, opts.devices, opts.chats, opts.chat_size, opts.messages, opts.payload
    );
    println!("single node in-process: embedded store, in-process backplane, QUIC on loopback\n");
    let run = demo::run(opts).await?;
    print!("{}", run.figures.render());
    if let Some(path) = a.json {
        write_json(&path, &run.figures)?;
    }
    Ok(if run.figures.lost == 0 && run.figures.unexpected == 0 {
        ExitCode::SUCCESS
    } else {
        eprintln!("tiercast demo: {} deliveries lost", run.figures.lost);
        ExitCode::FAILURE
    })
}

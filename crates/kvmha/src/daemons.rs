//! `kvmha manager …` and `kvmha agent …`: the daemons and their set-up.

use anyhow::Context;
use clap::{Args, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Debug, Subcommand)]
pub enum ManagerCommand {
    /// Create a cluster: CA, manager certificate, tokens, manager.toml. Prints the join
    /// token as the last line.
    Init {
        #[arg(long)]
        dir: PathBuf,
        /// Agent-facing mutual-TLS listener.
        #[arg(long, default_value = "0.0.0.0:7443")]
        listen: SocketAddr,
        /// Operator API (plain HTTP; keep it on loopback).
        #[arg(long, default_value = "127.0.0.1:7444")]
        api_listen: SocketAddr,
        /// Timing profile: fast, balanced or conservative.
        #[arg(long, default_value = "balanced")]
        profile: kvmha_core::Profile,
    },
    /// Run the manager until SIGTERM.
    Run {
        #[arg(long)]
        config: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
pub enum AgentCommand {
    /// Join a cluster: get a certificate signed by its CA and write agent.toml.
    Join(JoinArgs),
    /// Run the agent until SIGTERM (which sends a goodbye first).
    Run {
        #[arg(long)]
        config: PathBuf,
    },
}

#[derive(Debug, Args)]
pub struct JoinArgs {
    /// The manager's agent listener, `https://HOST:PORT`.
    #[arg(long)]
    manager: String,
    /// The join token printed by `kvmha manager init`.
    #[arg(long, env = "KVMHA_JOIN_TOKEN", hide_env_values = true)]
    token: String,
    #[arg(long)]
    name: String,
    #[arg(long)]
    dir: PathBuf,
    /// Where the agent takes the manager's commands.
    #[arg(long, default_value = "0.0.0.0:7445")]
    listen: SocketAddr,
    /// Where the manager and the other agents reach this one, if not `--listen`.
    #[arg(long)]
    advertise: Option<SocketAddr>,
    /// libvirt URI (`qemu:///system`, `test:///default`) or `lab`.
    #[arg(long)]
    hypervisor: Option<String>,
    /// vCPUs offered to VMs (default: this machine's); with --memory-mb.
    #[arg(long, requires = "memory_mb")]
    cpus: Option<u32>,
    /// Memory offered to VMs in MiB (default: this machine's); with --cpus.
    #[arg(long, requires = "cpus")]
    memory_mb: Option<u64>,
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?)
}

pub fn manager(command: ManagerCommand) -> anyhow::Result<()> {
    match command {
        ManagerCommand::Init { dir, listen, api_listen, profile } => {
            let output = kvmha_manager::init(&kvmha_manager::InitOptions { dir, listen, api_listen, profile })?;
            println!("config:          {}", output.config_file.display());
            println!("operator token:  {}", output.operator_token_file.display());
            println!("read-only token: {}", output.readonly_token_file.display());
            println!("start it with:   kvmha manager run --config {}", output.config_file.display());
            println!(
                "join agents with: kvmha agent join --manager https://MANAGER:{} --token TOKEN --name NAME --dir DIR",
                listen.port()
            );
            println!("join token:");
            println!("{}", output.join_token);
            Ok(())
        }
        ManagerCommand::Run { config } => {
            runtime()?.block_on(kvmha_manager::run(&config))?;
            Ok(())
        }
    }
}

pub fn agent(command: AgentCommand) -> anyhow::Result<()> {
    match command {
        AgentCommand::Join(args) => {
            let options = kvmha_agent::JoinOptions {
                manager_url: args.manager,
                token: args.token,
                name: args.name,
                dir: args.dir,
                listen: args.listen,
                advertise: args.advertise,
                hypervisor: args.hypervisor,
                capacity: match (args.cpus, args.memory_mb) {
                    (Some(cpus), Some(memory_mb)) => Some(kvmha_core::model::Resources { cpus, memory_mb }),
                    _ => None,
                },
            };
            let file = runtime()?.block_on(kvmha_agent::join(&options)).context("joining the cluster")?;
            println!("joined; start it with: kvmha agent run --config {}", file.display());
            Ok(())
        }
        AgentCommand::Run { config } => {
            let config = kvmha_agent::AgentConfig::load(&config)?;
            let listen = config.listen;
            runtime()?.block_on(async move {
                tokio::spawn(agent_ready_when_listening(listen));
                kvmha_agent::run(config).await
            })?;
            Ok(())
        }
    }
}

/// systemd readiness for the agent: `READY=1` once its command listener accepts
/// connections (the agent has loaded its certificates and bound), then `WATCHDOG=1` at half
/// of `WatchdogSec=` while the listener keeps accepting.
async fn agent_ready_when_listening(listen: SocketAddr) {
    use kvmha_manager::notify;
    let probe = if listen.ip().is_unspecified() {
        SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), listen.port())
    } else {
        listen
    };
    let accepts = || async move {
        matches!(
            tokio::time::timeout(std::time::Duration::from_secs(5), tokio::net::TcpStream::connect(probe)).await,
            Ok(Ok(_))
        )
    };
    while !accepts().await {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    notify::notify_or_log("READY=1\nSTATUS=agent running");
    let Some(every) = notify::watchdog_interval() else { return };
    loop {
        tokio::time::sleep(every).await;
        if accepts().await {
            notify::notify_or_log("WATCHDOG=1");
        }
    }
}

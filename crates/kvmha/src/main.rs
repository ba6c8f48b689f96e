use clap::{Parser, Subcommand};

mod daemons;
mod incidents;
mod ops;
mod scale;
mod simulate;

/// kvmha: high availability for KVM clusters.
#[derive(Debug, Parser)]
#[command(name = "kvmha", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Replay one seeded incident in the deterministic simulator and print its timeline.
    Simulate(simulate::SimulateArgs),
    /// Power control of one host through its BMC (IPMI, Redfish, ipmitool).
    Bmc(kvmha_bmc::cli::Args),
    /// Benchmarks.
    #[command(subcommand)]
    Bench(Bench),
    /// A real multi-host cluster on this machine: up, status, fault, down.
    #[command(subcommand)]
    Lab(kvmha_lab::cli::LabCommand),
    /// The manager daemon: `init` a cluster, `run` it.
    #[command(subcommand)]
    Manager(daemons::ManagerCommand),
    /// The agent daemon: `join` a cluster, `run` it.
    #[command(subcommand)]
    Agent(daemons::AgentCommand),
    /// Hosts as the manager sees them.
    Host {
        #[command(flatten)]
        api: ops::ApiArgs,
        #[command(subcommand)]
        command: ops::HostCommand,
    },
    /// VMs as the manager sees them.
    Vm {
        #[command(flatten)]
        api: ops::ApiArgs,
        #[command(subcommand)]
        command: ops::VmCommand,
    },
    /// The audit log.
    Events {
        #[command(flatten)]
        api: ops::ApiArgs,
        #[command(flatten)]
        args: ops::EventsArgs,
    },
    /// Host failure episodes: `list`, and `show ID` for the timeline (verdicts and their
    /// evidence, fence attempts, VM restarts).
    Incident {
        #[command(flatten)]
        api: ops::ApiArgs,
        #[command(subcommand)]
        command: incidents::IncidentCommand,
    },
    /// Cluster-wide switches.
    Cluster {
        #[command(flatten)]
        api: ops::ApiArgs,
        #[command(subcommand)]
        command: ops::ClusterCommand,
    },
}

#[derive(Debug, Subcommand)]
enum Bench {
    /// Median latency of status and off-and-verify: kvmha's IPMI client vs ipmitool.
    Bmc(kvmha_bmc::bench::Args),
    /// Recovery time of a power loss with and without a reachable BMC, in real labs
    /// (root): median and p95 of `recovery_ms` over --repeat runs of each.
    Failover(kvmha_lab::bench::Args),
    /// One real manager against N simulated agents (M HA VMs each): its memory, CPU and
    /// pings answered per second, then the time to plan every VM of 5 % of the hosts
    /// lost at once.
    Scale(scale::Args),
}

/// Log lines (the fencer's intent and outcome among them) go to stderr,
/// filtered by `KVMHA_LOG`, else `RUST_LOG`, else `warn`; stdout stays the
/// command's output (`--json`).
/// Logs go to stderr, filtered by `KVMHA_LOG`, else `RUST_LOG`, else `default`: daemons
/// say what they do (`info`), one-shot commands only what went wrong (`warn`).
fn init_logging(default: &str) {
    let filter = ["KVMHA_LOG", "RUST_LOG"]
        .iter()
        .find_map(|name| std::env::var(name).ok())
        .and_then(|directives| tracing_subscriber::EnvFilter::try_new(directives).ok())
        .unwrap_or_else(|| tracing_subscriber::EnvFilter::new(default));
    // Under systemd (JOURNAL_STREAM set) journald adds time and unit: plain lines without
    // colour; KVMHA_LOG_FORMAT=json gives one JSON object per line with every field.
    let journald = std::env::var_os("JOURNAL_STREAM").is_some();
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match std::env::var("KVMHA_LOG_FORMAT").as_deref() {
        Ok("json") => builder.json().flatten_event(true).init(),
        _ if journald => builder.with_ansi(false).without_time().init(),
        _ => builder.init(),
    }
}

fn main() -> anyhow::Result<()> {
    // The lab links kvmha as `kvmha-lab-vm`: the lab process driver's VM.
    let called_as = std::env::args_os().next().map(std::path::PathBuf::from);
    if called_as.as_deref().and_then(std::path::Path::file_name) == Some(kvmha_lab::cluster::LAB_VM_NAME.as_ref()) {
        std::process::exit(match kvmha_lab::cli::lab_vm_main() {
            code if code == std::process::ExitCode::SUCCESS => 0,
            _ => 2,
        });
    }
    let cli = Cli::parse();
    let default_level = match cli.command {
        Command::Manager(_) | Command::Agent(_) => "info",
        _ => "warn",
    };
    init_logging(default_level);
    match cli.command {
        Command::Simulate(args) => simulate::run(args),
        Command::Bmc(args) => Ok(kvmha_bmc::cli::run_blocking(args)?),
        Command::Bench(Bench::Bmc(args)) => Ok(kvmha_bmc::bench::run_blocking(args)?),
        Command::Bench(Bench::Failover(args)) => std::process::exit(kvmha_lab::bench::main(args)?),
        Command::Bench(Bench::Scale(args)) => std::process::exit(scale::main(args)?),
        Command::Lab(command) => Ok(kvmha_lab::cli::run(command)?),
        Command::Manager(command) => plain_errors(daemons::manager(command)),
        Command::Agent(command) => plain_errors(daemons::agent(command)),
        Command::Host { api, command } => plain_errors(ops::host(api, command)),
        Command::Vm { api, command } => plain_errors(ops::vm(api, command)),
        Command::Events { api, args } => plain_errors(ops::events(api, args)),
        Command::Cluster { api, command } => plain_errors(ops::cluster(api, command)),
        Command::Incident { api, command } => plain_errors(incidents::run(api, command)),
    }
}

/// Operators get one line per error (with its causes), never a backtrace.
fn plain_errors(result: anyhow::Result<()>) -> anyhow::Result<()> {
    if let Err(error) = result {
        eprintln!("error: {error:#}");
        std::process::exit(1);
    }
    Ok(())
}

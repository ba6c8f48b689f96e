//! kvmha-storage-tool: look at records on a pool, or act as one host's heartbeat
//! writer or lease holder in a separate process (the multi-process tests use it; an
//! operator can use `show` safely at any time: it only reads).
//!
//! ```text
//! kvmha-storage-tool show FILE
//! kvmha-storage-tool heartbeat --pool DIR --cluster C --host H [--boot-id ID]
//!                    [--interval-ms 1000] [--io-timeout-ms 1000] [--count N]
//! kvmha-storage-tool acquire --pool DIR --cluster C --host H --vm V [--boot-id ID] [--hold]
//!                    [--renewal-ms 1000] [--io-timeout-ms 500] [--self-fence-ms 4000]
//!                    [--watchdog-ms 5000] [--expiry-ms 10000]
//! ```
//!
//! Exit codes: 0 success, 1 error, 2 usage, 3 lease not acquired, 4 lease lost.

use std::collections::HashMap;
use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use kvmha_storage::{
    AgentState, AnyRecord, BootId, HeartbeatWriter, HostIdentity, LeaseClient, LeaseTimings, Name, Pool, StorageError,
};

const USAGE: &str = "usage: kvmha-storage-tool show FILE | heartbeat --pool DIR --cluster C --host H [...] | acquire --pool DIR --cluster C --host H --vm V [--hold] [...]";

fn main() -> ExitCode {
    let arguments: Vec<String> = std::env::args().skip(1).collect();
    let Some((command, rest)) = arguments.split_first() else {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    };
    let options = match Options::parse(rest) {
        Ok(options) => options,
        Err(message) => {
            eprintln!("{message}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let runtime =
        tokio::runtime::Builder::new_current_thread().enable_time().build().expect("a current-thread runtime starts");
    let outcome = match command.as_str() {
        "show" => show(&options),
        "heartbeat" => runtime.block_on(heartbeat(&options)),
        "acquire" => return runtime.block_on(acquire(&options)),
        _ => Err(format!("unknown command {command:?}")),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::from(1)
        }
    }
}

/// `--key value` pairs, `--flag`s and positional arguments.
#[derive(Debug)]
struct Options {
    values: HashMap<String, String>,
    flags: Vec<String>,
    positional: Vec<String>,
}

impl Options {
    fn parse(arguments: &[String]) -> Result<Self, String> {
        const FLAGS: [&str; 1] = ["hold"];
        let mut options = Self { values: HashMap::new(), flags: Vec::new(), positional: Vec::new() };
        let mut iterator = arguments.iter();
        while let Some(argument) = iterator.next() {
            let Some(key) = argument.strip_prefix("--") else {
                options.positional.push(argument.clone());
                continue;
            };
            if FLAGS.contains(&key) {
                options.flags.push(key.to_owned());
                continue;
            }
            let value = iterator.next().ok_or_else(|| format!("--{key} needs a value"))?;
            options.values.insert(key.to_owned(), value.clone());
        }
        Ok(options)
    }

    fn text(&self, key: &str) -> Result<&str, String> {
        self.values.get(key).map(String::as_str).ok_or_else(|| format!("--{key} is required"))
    }

    fn name(&self, key: &str) -> Result<Name, String> {
        Name::new(self.text(key)?).map_err(|error| error.to_string())
    }

    fn millis(&self, key: &str, default: u64) -> Result<Duration, String> {
        let Some(text) = self.values.get(key) else {
            return Ok(Duration::from_millis(default));
        };
        text.parse().map(Duration::from_millis).map_err(|_| format!("--{key} wants milliseconds, got {text:?}"))
    }

    fn identity(&self) -> Result<HostIdentity, String> {
        let boot_id = match self.values.get("boot-id") {
            Some(text) => BootId::parse(text),
            None => BootId::current(),
        }
        .map_err(|error| error.to_string())?;
        Ok(HostIdentity { cluster: self.name("cluster")?, host: self.name("host")?, boot_id })
    }

    fn pool(&self) -> Result<Pool, String> {
        Pool::open("pool", self.text("pool")?).map_err(|error| error.to_string())
    }
}

fn show(options: &Options) -> Result<(), String> {
    let [path] = options.positional.as_slice() else {
        return Err("show takes one file".to_owned());
    };
    let bytes = std::fs::read(path).map_err(|error| format!("{path}: {error}"))?;
    match AnyRecord::decode_any_cluster(&bytes).map_err(|error| format!("{path}: {error}"))? {
        AnyRecord::Heartbeat(record) => println!(
            "heartbeat cluster={} host={} boot_id={} counter={} writer_unix_ms={} agent_state={:?} watchdog_armed={}",
            record.cluster,
            record.host,
            record.boot_id,
            record.counter,
            record.writer_unix_ms,
            record.agent_state,
            record.watchdog_armed
        ),
        AnyRecord::Lease(record) => println!(
            "lease cluster={} vm={} state={:?} owner_host={} owner_boot_id={} counter={} acquired_at_counter={} writer_unix_ms={}",
            record.cluster,
            record.vm,
            record.state,
            record.owner_host,
            record.owner_boot_id,
            record.counter,
            record.acquired_at_counter,
            record.writer_unix_ms
        ),
    }
    Ok(())
}

async fn heartbeat(options: &Options) -> Result<(), String> {
    let interval = options.millis("interval-ms", 1_000)?;
    let io_timeout = options.millis("io-timeout-ms", 1_000)?;
    let count: Option<u64> = match options.values.get("count") {
        Some(text) => Some(text.parse().map_err(|_| "--count wants a number")?),
        None => None,
    };
    let mut writer = HeartbeatWriter::resume(options.pool()?, options.identity()?, io_timeout).await;
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut written = 0u64;
    while count.is_none_or(|count| written < count) {
        ticker.tick().await;
        match writer.beat(AgentState::Running, false).await {
            Ok(record) => {
                written += 1;
                let mut stdout = std::io::stdout().lock();
                let _ = writeln!(stdout, "beat {}", record.counter);
                let _ = stdout.flush();
            }
            Err(error) => eprintln!("heartbeat write failed: {error}"),
        }
    }
    Ok(())
}

async fn acquire(options: &Options) -> ExitCode {
    let client = match lease_client(options) {
        Ok(client) => client,
        Err(message) => {
            eprintln!("error: {message}");
            return ExitCode::from(2);
        }
    };
    let vm = match options.name("vm") {
        Ok(vm) => vm,
        Err(message) => {
            eprintln!("error: {message}");
            return ExitCode::from(2);
        }
    };
    let mut held = match client.acquire(&vm).await {
        Ok(held) => held,
        Err(error) => {
            println!("not acquired: {error}");
            return ExitCode::from(3);
        }
    };
    println!("acquired {}", held.record().acquired_at_counter);
    let _ = std::io::stdout().flush();
    if !options.flags.iter().any(|flag| flag == "hold") {
        return ExitCode::SUCCESS;
    }
    loop {
        tokio::time::sleep(client.timings().renewal_interval).await;
        match client.renew(&mut held).await {
            Ok(()) => {}
            Err(error @ StorageError::LeaseLost { .. }) => {
                println!("lost: {error}");
                return ExitCode::from(4);
            }
            // Storage trouble: keep trying until the self-fence deadline turns it
            // into LeaseLost.
            Err(error) => eprintln!("renewal failed: {error}"),
        }
    }
}

fn lease_client(options: &Options) -> Result<LeaseClient, String> {
    let timings = LeaseTimings {
        renewal_interval: options.millis("renewal-ms", 1_000)?,
        io_timeout: options.millis("io-timeout-ms", 500)?,
        self_fence_deadline: options.millis("self-fence-ms", 4_000)?,
        watchdog_timeout: options.millis("watchdog-ms", 5_000)?,
        lease_expiry: options.millis("expiry-ms", 10_000)?,
    };
    LeaseClient::new(options.pool()?, options.identity()?, timings).map_err(|error| error.to_string())
}

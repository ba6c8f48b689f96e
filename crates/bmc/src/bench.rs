//! `kvmha bench bmc`: median latency of a status read and of
//! off-and-verify (the fencer's power off plus read-back), for our IPMI
//! client and for ipmitool, against the same throwaway ipmi_sim.
//!
//! Both use cipher suite 3 (the strongest ipmi_sim offers), one session per
//! operation, as ipmitool does per invocation: the numbers compare like
//! with like. Numbers, never assertions: nothing here fails on slowness.

use crate::error::{BmcError, Result};
use crate::ipmi::{IpmiClient, IpmiConfig};
use crate::ipmitool::{Ipmitool, IpmitoolConfig};
use crate::sim::{IpmiSim, ADMIN_PASSWORD, ADMIN_USER};
use crate::{Fencer, PowerControl, PowerState, Secret};
use std::io::Write;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Measurements per operation and client.
    #[arg(long, default_value_t = 20)]
    pub iterations: u32,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Measurement {
    pub operation: &'static str,
    pub ours_median_ms: f64,
    pub ipmitool_median_ms: f64,
    /// ipmitool's median divided by ours: above 1 means we are faster.
    pub ratio: f64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct BenchReport {
    pub iterations: u32,
    pub measurements: Vec<Measurement>,
}

fn median_ms(mut samples: Vec<Duration>) -> f64 {
    samples.sort();
    let middle = samples.len() / 2;
    let median = if samples.len() % 2 == 1 { samples[middle] } else { (samples[middle - 1] + samples[middle]) / 2 };
    median.as_secs_f64() * 1000.0
}

async fn time_status(driver: &dyn PowerControl, iterations: u32) -> Result<Vec<Duration>> {
    let mut samples = Vec::with_capacity(iterations as usize);
    for _ in 0..iterations {
        let started = Instant::now();
        driver.status().await?;
        samples.push(started.elapsed());
    }
    Ok(samples)
}

async fn time_off_and_verify(
    driver: &dyn PowerControl,
    restore: &dyn PowerControl,
    iterations: u32,
) -> Result<Vec<Duration>> {
    let fencer =
        Fencer { deadline: Duration::from_secs(10), poll_interval: Duration::from_millis(10), ..Fencer::default() };
    let mut samples = Vec::with_capacity(iterations as usize);
    for _ in 0..iterations {
        // Untimed: put the chassis back on so every sample does real work.
        restore.power_on().await?;
        if restore.status().await? != PowerState::On {
            return Err(BmcError::protocol("bench: chassis did not come back on"));
        }
        let started = Instant::now();
        fencer.fence(driver).await?;
        samples.push(started.elapsed());
    }
    Ok(samples)
}

pub async fn measure(iterations: u32) -> Result<BenchReport> {
    let iterations = iterations.max(1);
    let sim = IpmiSim::start(true)?;
    let mut ours_config = IpmiConfig::new(sim.address(), ADMIN_USER, Secret::new(ADMIN_PASSWORD));
    ours_config.cipher_suites = vec![3];
    let ours = IpmiClient::new(ours_config)?;
    let ipmitool = Ipmitool::new(IpmitoolConfig::new(sim.address(), ADMIN_USER, Secret::new(ADMIN_PASSWORD)))?;

    let mut measurements = Vec::new();
    let ours_status = median_ms(time_status(&ours, iterations).await?);
    let ipmitool_status = median_ms(time_status(&ipmitool, iterations).await?);
    measurements.push(Measurement {
        operation: "status read",
        ours_median_ms: ours_status,
        ipmitool_median_ms: ipmitool_status,
        ratio: ipmitool_status / ours_status,
    });
    let ours_fence = median_ms(time_off_and_verify(&ours, &ours, iterations).await?);
    let ipmitool_fence = median_ms(time_off_and_verify(&ipmitool, &ours, iterations).await?);
    measurements.push(Measurement {
        operation: "off-and-verify",
        ours_median_ms: ours_fence,
        ipmitool_median_ms: ipmitool_fence,
        ratio: ipmitool_fence / ours_fence,
    });
    Ok(BenchReport { iterations, measurements })
}

pub async fn run(args: Args) -> Result<()> {
    let report = measure(args.iterations).await?;
    let mut out = std::io::stdout().lock();
    let write_error = |source| BmcError::Io { context: "write output".into(), source };
    if args.json {
        let json = serde_json::to_string(&report).expect("report serializes");
        return writeln!(out, "{json}").map_err(write_error);
    }
    writeln!(out, "bmc benchmark: ipmi_sim, cipher suite 3, {} iterations, medians", report.iterations)
        .map_err(write_error)?;
    writeln!(out, "{:<16} {:>10} {:>12} {:>8}", "operation", "kvmha", "ipmitool", "ratio").map_err(write_error)?;
    for measurement in &report.measurements {
        writeln!(
            out,
            "{:<16} {:>7.1} ms {:>9.1} ms {:>7.1}x",
            measurement.operation, measurement.ours_median_ms, measurement.ipmitool_median_ms, measurement.ratio
        )
        .map_err(write_error)?;
    }
    Ok(())
}

/// For callers without a tokio runtime (the `kvmha` binary's sync main).
pub fn run_blocking(args: Args) -> Result<()> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|source| BmcError::Io { context: "start async runtime".into(), source })?
        .block_on(run(args))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_samples() {
        let ms = Duration::from_millis;
        assert_eq!(median_ms(vec![ms(5), ms(1), ms(3)]), 3.0);
        assert_eq!(median_ms(vec![ms(4), ms(1), ms(3), ms(2)]), 2.5);
    }

    #[tokio::test]
    async fn bench_runs_end_to_end_against_ipmi_sim() {
        let report = measure(2).await.unwrap();
        assert_eq!(report.measurements.len(), 2);
        for measurement in &report.measurements {
            assert!(measurement.ours_median_ms > 0.0 && measurement.ipmitool_median_ms > 0.0);
        }
    }
}

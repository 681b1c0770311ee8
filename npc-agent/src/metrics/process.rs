//! The standard Prometheus process metrics, read from `/proc/self` at scrape time.
use std::fmt;

use anyhow::{Context as _, Result};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
    registry::Unit,
};
use tracing::warn;

/// One reading of the process's resources.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) struct ProcessStats {
    pub resident_memory_bytes: u64,
    /// User plus system CPU time.
    pub cpu_seconds: f64,
    pub open_fds: u64,
    /// The soft limit on open files; `None`: unlimited.
    pub max_fds: Option<u64>,
    /// Unix time the process started.
    pub start_time_seconds: f64,
}

impl ProcessStats {
    pub(super) fn read() -> Result<ProcessStats> {
        let me = procfs::process::Process::myself().context("opening /proc/self")?;
        let stat = me.stat().context("reading /proc/self/stat")?;
        let ticks = procfs::ticks_per_second() as f64;
        let boot = procfs::boot_time_secs().context("reading the boot time from /proc/stat")?;
        let open_fds = me.fd_count().context("counting /proc/self/fd")? as u64;
        let max_fds = match me
            .limits()
            .context("reading /proc/self/limits")?
            .max_open_files
            .soft_limit
        {
            procfs::process::LimitValue::Value(n) => Some(n),
            procfs::process::LimitValue::Unlimited => None,
        };
        Ok(ProcessStats {
            resident_memory_bytes: stat.rss.saturating_mul(procfs::page_size()),
            cpu_seconds: (stat.utime + stat.stime) as f64 / ticks,
            open_fds,
            max_fds,
            start_time_seconds: boot as f64 + stat.starttime as f64 / ticks,
        })
    }
}

/// `process_resident_memory_bytes`, `process_cpu_seconds_total`, `process_open_fds`,
/// `process_max_fds` and `process_start_time_seconds`.
#[derive(Debug)]
pub(super) struct ProcessCollector;

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let stats = match ProcessStats::read() {
            Ok(s) => s,
            Err(e) => {
                warn!(
                    error = format!("{e:#}"),
                    "metrics: reading the process's stats failed"
                );
                return Ok(());
            }
        };
        let m = encoder.encode_descriptor(
            "process_resident_memory",
            "Resident memory size in bytes.",
            Some(&Unit::Bytes),
            MetricType::Gauge,
        )?;
        ConstGauge::new(stats.resident_memory_bytes).encode(m)?;
        let m = encoder.encode_descriptor(
            "process_cpu",
            "Total user and system CPU time spent in seconds.",
            Some(&Unit::Seconds),
            MetricType::Counter,
        )?;
        ConstCounter::new(stats.cpu_seconds).encode(m)?;
        let m = encoder.encode_descriptor(
            "process_open_fds",
            "Number of open file descriptors.",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(stats.open_fds).encode(m)?;
        if let Some(max) = stats.max_fds {
            let m = encoder.encode_descriptor(
                "process_max_fds",
                "Maximum number of open file descriptors.",
                None,
                MetricType::Gauge,
            )?;
            ConstGauge::new(max).encode(m)?;
        }
        let m = encoder.encode_descriptor(
            "process_start_time",
            "Start time of the process since the Unix epoch in seconds.",
            Some(&Unit::Seconds),
            MetricType::Gauge,
        )?;
        ConstGauge::new(stats.start_time_seconds).encode(m)
    }
}

#[cfg(test)]
mod tests {
    use std::time::{SystemTime, UNIX_EPOCH};

    use super::*;

    #[test]
    fn process_stats_are_plausible() {
        let s = ProcessStats::read().unwrap();
        assert!(s.resident_memory_bytes > 1 << 20, "{s:?}");
        assert!(s.cpu_seconds >= 0.0, "{s:?}");
        assert!(s.open_fds >= 3, "{s:?}");
        if let Some(max) = s.max_fds {
            assert!(max >= s.open_fds, "{s:?}");
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        // Started in the past, and not before 2020. (The boot time and the start tick are whole
        // seconds and ticks, so allow some slack.)
        assert!(s.start_time_seconds <= now + 2.0, "{s:?} now {now}");
        assert!(s.start_time_seconds > 1_577_836_800.0, "{s:?}");
    }

    #[test]
    fn process_families_are_encoded() {
        let text = super::super::Metrics::without_datapath().encode().unwrap();
        for name in [
            "process_resident_memory_bytes ",
            "process_cpu_seconds_total ",
            "process_open_fds ",
            "process_start_time_seconds ",
        ] {
            assert!(
                text.lines().any(|l| l.starts_with(name)),
                "missing {name:?} in\n{text}"
            );
        }
        assert!(
            text.contains("# TYPE process_cpu_seconds counter"),
            "{text}"
        );
        assert!(
            text.contains("# UNIT process_resident_memory_bytes bytes"),
            "{text}"
        );
    }
}

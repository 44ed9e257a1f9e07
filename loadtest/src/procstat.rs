//! CPU and memory of a process, read from `/proc/<pid>/stat` and
//! `/proc/<pid>/status` (Linux): the server's when its pid is given, and
//! this tool's own (both share the machine).

use std::time::Instant;

/// Samples one process: CPU use since the previous sample and resident memory.
pub struct ProcSampler {
    pid: String,
    ticks_per_sec: f64,
    last: Option<(Instant, u64)>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProcSample {
    /// Percent of one core since the previous sample (200 = two cores busy).
    pub cpu_percent: Option<f64>,
    pub rss_mb: f64,
}

impl ProcSampler {
    /// `None` for this process.
    pub fn new(pid: Option<u32>) -> ProcSampler {
        // SAFETY: sysconf only reads a configuration value.
        let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        ProcSampler {
            pid: pid.map_or_else(|| "self".to_owned(), |p| p.to_string()),
            ticks_per_sec: if ticks > 0 { ticks as f64 } else { 100.0 },
            last: None,
        }
    }

    /// None when the process is gone (or this is not Linux).
    pub fn sample(&mut self) -> Option<ProcSample> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid)).ok()?;
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid)).ok()?;
        let ticks = cpu_ticks(&stat)?;
        let now = Instant::now();
        let cpu_percent = self.last.map(|(at, before)| {
            let secs = (now - at).as_secs_f64().max(1e-3);
            ticks.saturating_sub(before) as f64 / self.ticks_per_sec / secs * 100.0
        });
        self.last = Some((now, ticks));
        Some(ProcSample { cpu_percent, rss_mb: rss_kb(&status)? as f64 / 1024.0 })
    }
}

/// utime + stime: fields 14 and 15 of `stat`, counted after the `(comm)`
/// field, which may itself hold spaces and parentheses.
fn cpu_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state).
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

fn rss_kb(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_after_the_command_name() {
        let stat = "4242 (vox gate) (x)) S 1 4242 4242 0 -1 4194560 2917 0 0 0 150 37 0 0 20 0 12 0 1234 100000 5000";
        assert_eq!(cpu_ticks(stat), Some(187));
        assert_eq!(rss_kb("Name:\tvoxgate\nVmRSS:\t  123456 kB\n"), Some(123456));
    }

    #[test]
    fn this_process_can_be_sampled() {
        let mut s = ProcSampler::new(None);
        let first = s.sample().expect("/proc/self");
        assert_eq!(first.cpu_percent, None);
        assert!(first.rss_mb > 1.0);
        let busy = Instant::now();
        while busy.elapsed().as_millis() < 50 {
            std::hint::black_box(busy.elapsed());
        }
        assert!(s.sample().expect("again").cpu_percent.is_some());
        assert!(ProcSampler::new(Some(u32::MAX)).sample().is_none());
    }
}

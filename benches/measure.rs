//! What the benchmarks read about a process (their own, the gateway's, the broker's): CPU
//! seconds and resident memory.

/// CPU seconds (user + system) of process `pid` so far, to the nanosecond (its CPU-time
/// clock; /proc's figures are in ticks of 10 ms); 0 when it cannot be read.
pub fn cpu_seconds(pid: i32) -> f64 {
    let mut clock: libc::clockid_t = 0;
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: both calls only write the values they are given, which outlive them.
    let read = unsafe {
        libc::clock_getcpuclockid(pid, &mut clock) == 0 && libc::clock_gettime(clock, &mut t) == 0
    };
    if read {
        t.tv_sec as f64 + t.tv_nsec as f64 / 1e9
    } else {
        0.0
    }
}

/// (current RSS, peak RSS) of process `pid`, in MiB.
pub fn rss_mib(pid: i32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib = |key: &str| {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (kib("VmRSS:") / 1024.0, kib("VmHWM:") / 1024.0)
}

//! The per-cycle table printed by `demo`, `ship` and `hydrate`.

use std::time::Duration;

/// One row.
#[derive(Clone, Debug)]
pub struct Row {
    pub cycle: u64,
    pub kind: String,
    pub changed_bytes: u64,
    pub blob_bytes: u64,
    pub ship: Duration,
    pub hydrate: Duration,
    /// When the next delta would run by the schedule; `None` after the cutover.
    pub next_delta_in: Option<Duration>,
    pub verified: Option<bool>,
}

/// Human-readable bytes (binary units).
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// `1h 00m`, `12h 00m`, `4.2 s`, `850 ms`.
pub fn duration(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 3600 {
        format!("{}h {:02}m", s / 3600, (s % 3600) / 60)
    } else if s >= 60 {
        format!("{}m {:02}s", s / 60, s % 60)
    } else if d.as_millis() >= 1000 {
        format!("{:.2} s", d.as_secs_f64())
    } else {
        format!("{} ms", d.as_millis())
    }
}

/// Bytes per second as MiB/s.
pub fn rate(bytes_done: u64, d: Duration) -> String {
    let secs = d.as_secs_f64();
    if secs <= 0.0 {
        return "-".into();
    }
    format!("{:.0} MiB/s", bytes_done as f64 / secs / (1024.0 * 1024.0))
}

/// The header line.
pub fn header() -> String {
    format!(
        "{:>5}  {:<12} {:>11} {:>11} {:>6} {:>9} {:>9} {:>11} {:>10}  {}",
        "cycle",
        "kind",
        "changed",
        "blob bytes",
        "ratio",
        "ship",
        "hydrate",
        "throughput",
        "next delta",
        "verified"
    )
}

/// One row as a line.
pub fn line(r: &Row) -> String {
    let ratio = if r.blob_bytes == 0 {
        "-".to_owned()
    } else {
        format!("{:.2}", r.changed_bytes as f64 / r.blob_bytes as f64)
    };
    let verified = match r.verified {
        Some(true) => "identical",
        Some(false) => "DIFFERENT",
        None => "-",
    };
    format!(
        "{:>5}  {:<12} {:>11} {:>11} {:>6} {:>9} {:>9} {:>11} {:>10}  {}",
        r.cycle,
        r.kind,
        bytes(r.changed_bytes),
        bytes(r.blob_bytes),
        ratio,
        duration(r.ship),
        duration(r.hydrate),
        rate(r.changed_bytes, r.ship + r.hydrate),
        match r.next_delta_in {
            None => "-".to_owned(),
            Some(d) if d.is_zero() => "at once".to_owned(),
            Some(d) => format!("in {}", duration(d)),
        },
        verified
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_units() {
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(16 << 10), "16.0 KiB");
        assert_eq!(bytes(3 << 30), "3.0 GiB");
        assert_eq!(duration(Duration::from_secs(4 * 3600)), "4h 00m");
        assert_eq!(duration(Duration::from_millis(850)), "850 ms");
        assert_eq!(rate(1 << 20, Duration::from_secs(1)), "1 MiB/s");
    }
}

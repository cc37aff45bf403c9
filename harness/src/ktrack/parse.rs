//! The lines of a tracefs `trace_pipe`: block events, markers and lost-event notices.
//!
//! A line looks like
//! `  dd-21656 [001] ..... 9921.907373: block_bio_queue: 7,0 WS 80 + 8 [dd]`: the task, CPU,
//! flags and timestamp, then the event name and its printed fields. Block events print the
//! device as `major,minor`, the operation flags (`rwbs`), and the range as `sector + count`
//! (`block_rq_complete` puts `(cmd)` between them and the I/O priority after). The kernel's
//! `blk_fill_rwbs` writes one operation letter (`R` read, `W` write, `D` discard, `N` other
//! operations such as write-zeroes, `F` flush), optionally after an `F` for a preflush and
//! before `F`/`A`/`S`/`M` modifiers.
//!
//! What changes data is every event with a non-empty range that is not a read: marking more than
//! was written is safe, missing a write is not. A block event line that cannot be read is
//! reported as [`TraceLine::Malformed`], which the tracker treats as lost tracking.

/// The block events the tracker enables, and reads.
pub const BLOCK_EVENTS: [&str; 3] = ["block_bio_queue", "block_bio_complete", "block_rq_complete"];

/// The event a `trace_marker` write shows up as.
const MARKER_EVENT: &str = "tracing_mark_write";

/// One parsed `trace_pipe` line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TraceLine {
    /// A block event that may have changed data: `sector_count` sectors from `start_sector` on
    /// device `major:minor`.
    Change {
        /// The device's major number.
        major: u32,
        /// The device's minor number.
        minor: u32,
        /// First sector (512 bytes) of the range.
        start_sector: u64,
        /// Sectors in the range; never 0.
        sector_count: u64,
    },
    /// A block event that changes nothing: a read, or a flush (no range).
    NoChange,
    /// A line written to the instance's `trace_marker`.
    Marker(String),
    /// The kernel overwrote this many events before they were read (`[LOST N EVENTS]`).
    Lost(u64),
    /// A line of a block event this parser could not read; its range is unknown.
    Malformed(String),
    /// Anything else: another event, an empty line.
    Other,
}

/// Parses one line (with or without its newline).
pub fn parse_line(line: &str) -> TraceLine {
    let line = line.trim_end_matches(['\n', '\r']);
    if let Some(n) = lost_events(line) {
        return TraceLine::Lost(n);
    }
    let Some((event, payload)) = split_event(line) else {
        return TraceLine::Other;
    };
    if event == MARKER_EVENT {
        return TraceLine::Marker(payload.to_owned());
    }
    if !BLOCK_EVENTS.contains(&event) {
        return TraceLine::Other;
    }
    parse_block(payload).unwrap_or_else(|| TraceLine::Malformed(line.to_owned()))
}

/// `CPU:1 [LOST 3920 EVENTS]`.
fn lost_events(line: &str) -> Option<u64> {
    let rest = line.trim_start().strip_prefix("CPU:")?;
    let start = rest.find("[LOST ")? + "[LOST ".len();
    let rest = &rest[start..];
    let end = rest.find(" EVENTS]")?;
    rest[..end].trim().parse().ok()
}

/// Finds `<timestamp>: <event>: <payload>`. The task name before the timestamp may itself hold
/// `: `, so the event is the first `name: ` that follows a token shaped like a timestamp.
fn split_event(line: &str) -> Option<(&str, &str)> {
    for (at, _) in line.match_indices(": ") {
        let before = &line[..at];
        let stamp = before.rsplit(char::is_whitespace).next().unwrap_or("");
        if !is_timestamp(stamp) {
            continue;
        }
        let rest = &line[at + 2..];
        let name_len = rest
            .bytes()
            .take_while(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'_')
            .count();
        if name_len == 0 || !rest[name_len..].starts_with(':') {
            continue;
        }
        let after = &rest[name_len + 1..];
        return Some((&rest[..name_len], after.strip_prefix(' ').unwrap_or(after)));
    }
    None
}

fn is_timestamp(s: &str) -> bool {
    let mut parts = s.splitn(2, '.');
    let whole = parts.next().unwrap_or("");
    let frac = parts.next().unwrap_or("");
    !whole.is_empty()
        && !frac.is_empty()
        && whole.bytes().all(|b| b.is_ascii_digit())
        && frac.bytes().all(|b| b.is_ascii_digit())
}

/// `7,0 WS 80 + 8 [dd]`, `7,0 WS () 80 + 8 be,0,4 [0]`, `7,0 WS 80 + 8 [0]`.
fn parse_block(payload: &str) -> Option<TraceLine> {
    let tokens: Vec<&str> = payload.split_whitespace().collect();
    let (major, minor) = tokens.first()?.split_once(',')?;
    let major: u32 = major.parse().ok()?;
    let minor: u32 = minor.parse().ok()?;
    let rwbs = *tokens.get(1)?;
    if rwbs.is_empty() || !rwbs.bytes().all(|b| b.is_ascii_uppercase()) {
        return None;
    }
    let (start_sector, sector_count) = (2..tokens.len().saturating_sub(2)).find_map(|i| {
        if tokens[i + 1] != "+" {
            return None;
        }
        let start: u64 = tokens[i].parse().ok()?;
        let count: u64 = tokens[i + 2].parse().ok()?;
        Some((start, count))
    })?;
    if rwbs.contains('R') || sector_count == 0 {
        return Some(TraceLine::NoChange);
    }
    Some(TraceLine::Change {
        major,
        minor,
        start_sector,
        sector_count,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(minor: u32, start_sector: u64, sector_count: u64) -> TraceLine {
        TraceLine::Change {
            major: 7,
            minor,
            start_sector,
            sector_count,
        }
    }

    /// Lines recorded from a tracefs instance on Linux 6.18 (mkfs.ext4, dd, blkdiscard on loop
    /// devices; a marker; a lost-events notice from an overflowed 4 KiB buffer), in file order.
    #[test]
    fn recorded_trace_pipe_lines() {
        let recorded = include_str!("testdata/trace_pipe.txt");
        let parsed: Vec<TraceLine> = recorded.lines().map(parse_line).collect();
        let expected = vec![
            change(0, 0, 8),        // mkfs write, queued
            change(0, 8, 8),        // the next one
            TraceLine::NoChange,    // a write request completing with no range
            TraceLine::NoChange,    // a preflush with no data
            TraceLine::NoChange,    // the flush completing (sector u64::MAX, no range)
            change(0, 130944, 128), // write-zeroes (N), queued
            change(0, 130944, 128), // and completed
            change(0, 2048, 128),   // a discard, queued
            change(0, 2048, 128),   // and completed
            TraceLine::NoChange,    // a read-ahead
            TraceLine::NoChange,    // a read completing
            TraceLine::Marker("replicator-ktrack 00112233 1".into()),
            change(1, 0, 8), // another device: parsed, the tracker filters by device
            change(1, 0, 8),
            TraceLine::Lost(3920),
            change(0, 15680, 8),
        ];
        assert_eq!(parsed, expected);
    }

    #[test]
    fn bio_complete_other_events_odd_task_names_and_damage() {
        // block_bio_complete prints "%d,%d %s %llu + %u [%d]".
        assert_eq!(
            parse_line(
                "  ksoftirqd/0-14 [000] ..s.. 10044.311390: block_bio_complete: 7,0 WS 4096 + 16 [0]\n"
            ),
            change(0, 4096, 16)
        );
        // A task name holding ": " and a fake event name does not fool the parser.
        assert_eq!(
            parse_line(
                "  x: block_rq_complete: 7,0 W 1 + 1-99 [001] ..... 10044.311392: block_bio_queue: 7,0 WS 300 + 8 [x: b]"
            ),
            change(0, 300, 8)
        );
        assert_eq!(
            parse_line(
                "  kworker/0:1-12 [000] ..... 10044.3: block_dirty_buffer: 7,0 sector=8 size=4096"
            ),
            TraceLine::Other
        );
        assert_eq!(parse_line(""), TraceLine::Other);
        assert_eq!(
            parse_line("# tracer: nop"),
            TraceLine::Other,
            "comment lines of the trace file"
        );
        // A block event whose range cannot be read must not be ignored.
        for damaged in [
            "  dd-1 [000] ..... 1.5: block_bio_queue: 7,0 WS 77 + [dd]",
            "  dd-1 [000] ..... 1.5: block_bio_queue: 7;0 WS 77 + 8 [dd]",
            "  dd-1 [000] ..... 1.5: block_rq_complete: 7,0 ws () 77 + 8 be,0,4 [0]",
            "  dd-1 [000] ..... 1.5: block_bio_queue:",
        ] {
            assert!(
                matches!(parse_line(damaged), TraceLine::Malformed(_)),
                "{damaged}"
            );
        }
        assert_eq!(parse_line("CPU:0 [LOST 12 EVENTS]"), TraceLine::Lost(12));
    }
}

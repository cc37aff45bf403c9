//! Bandwidth throttling: a limit on the bytes per second of put and get payloads, following a
//! schedule by time of day, shared fairly by concurrent callers.
//!
//! # Schedule
//!
//! A [`RateSchedule`] is written as comma-separated entries `RANGE=RATE`, for example
//! `08:00-20:00=100Mbit/s,*=unlimited`:
//!
//! - `RANGE` is `HH:MM-HH:MM`, from the start (included) to the end (excluded), in local time
//!   (UTC shifted by the configured [`UtcOffset`]). A range whose end is before its start wraps
//!   midnight (`22:00-06:00`); `24:00` is allowed as an end. Ranges may not overlap.
//! - `*` stands for every time no range covers. Without a `*` entry, those times are unlimited.
//!   A schedule of a bare rate (`50MB/s`) is that rate all day.
//! - `RATE` is `unlimited` or a decimal number and a unit: bits per second `bit/s`, `kbit/s`,
//!   `Mbit/s`, `Gbit/s`, `Tbit/s` (also `Kbit/s`, `bps`, `kbps`, `Mbps`, `Gbps`), `Kibit/s`,
//!   `Mibit/s`, `Gibit/s`; bytes per second `B/s`, `kB/s` (`KB/s`), `MB/s`, `GB/s`, `TB/s`,
//!   `KiB/s`, `MiB/s`, `GiB/s`, `TiB/s`. `k`, `M`, `G`, `T` are powers of 1000, `Ki`, `Mi`, `Gi`,
//!   `Ti` powers of 1024; `b` is a bit and `B` a byte.
//!
//! A spec that cannot be parsed fails with a [`ScheduleSpecError`] naming the column and what
//! was expected there.
//!
//! # Fairness
//!
//! The throttle is a virtual-time scheduler: a transfer is charged in chunks of at most
//! [`ThrottleConfig::chunk_bytes`], and each chunk reserves the next free slot of the link (its
//! length is the chunk's size over the rate in force when it starts), then waits until that slot
//! ends. Slots are handed out first come, first served, and a caller holds at most one slot
//! ahead at a time, so concurrent transfers take turns chunk by chunk: each of N busy callers gets
//! about 1/N of the rate, and a small transfer is never queued behind the whole of a large one.
//! The queue is bounded by the callers' own concurrency: one chunk per concurrent transfer.
//!
//! Puts are charged before their payload is handed to the wrapped sink; gets after the payload
//! arrives, before it is returned. Lists and deletes carry no payload and are not throttled.
//! Time is read and waited on only through the injected [`Clock`].

use std::fmt;
use std::num::NonZeroU64;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use super::lock;
use crate::clock::{Clock, Timestamp};
use crate::key::validate_prefix;
use crate::{ObjectMeta, PutMode, Sink, SinkError, SinkErrorKind, validate_key};

const MINUTES_PER_DAY: u16 = 24 * 60;
const SECONDS_PER_DAY: i64 = 24 * 3600;

/// A transfer rate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rate {
    /// No limit.
    Unlimited,
    /// At most this many bytes per second.
    BytesPerSecond(NonZeroU64),
}

impl Rate {
    /// How long `bytes` take at this rate, rounded up to the nanosecond.
    pub fn duration_of(self, bytes: u64) -> Duration {
        match self {
            Rate::Unlimited => Duration::ZERO,
            Rate::BytesPerSecond(rate) => {
                let ns = (u128::from(bytes) * 1_000_000_000).div_ceil(u128::from(rate.get()));
                Duration::from_nanos(u64::try_from(ns).unwrap_or(u64::MAX))
            }
        }
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rate::Unlimited => write!(f, "unlimited"),
            Rate::BytesPerSecond(r) => write!(f, "{r}B/s"),
        }
    }
}

impl FromStr for Rate {
    type Err = ScheduleSpecError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_rate(s, 0, s)
    }
}

/// A fixed offset of local time from UTC, between -18:00 and +18:00.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UtcOffset {
    seconds: i32,
}

impl UtcOffset {
    /// The largest offset accepted, either way.
    pub const LIMIT_SECONDS: i32 = 18 * 3600;
    /// UTC itself.
    pub const UTC: UtcOffset = UtcOffset { seconds: 0 };

    /// An offset of `seconds` east of UTC (negative west), or `None` beyond
    /// [`UtcOffset::LIMIT_SECONDS`].
    pub fn from_seconds(seconds: i32) -> Option<Self> {
        (seconds.abs() <= Self::LIMIT_SECONDS).then_some(UtcOffset { seconds })
    }

    /// The offset in seconds east of UTC.
    pub fn seconds(self) -> i32 {
        self.seconds
    }

    /// Parses `Z`, `UTC`, or a sign and `HH:MM` (or `HH`): `+02:00`, `-05:30`, `UTC+01:00`.
    pub fn parse(spec: &str) -> Result<Self, ScheduleSpecError> {
        let err = |position: usize, found: &str| {
            ScheduleSpecError::new(
                spec,
                position,
                "a UTC offset: `Z`, `UTC`, or `+HH:MM` / `-HH:MM` up to 18:00",
                found,
            )
        };
        let trimmed = spec.trim();
        let lead = spec.len() - spec.trim_start().len();
        if trimmed.is_empty() {
            return Err(err(lead, ""));
        }
        if trimmed == "Z" || trimmed == "UTC" {
            return Ok(UtcOffset::UTC);
        }
        let (body, at) = match trimmed.strip_prefix("UTC") {
            Some(rest) => (rest, lead + 3),
            None => (trimmed, lead),
        };
        let (sign, digits) = match body.as_bytes().first() {
            Some(b'+') => (1, &body[1..]),
            Some(b'-') => (-1, &body[1..]),
            _ => return Err(err(at, body)),
        };
        let (hours, minutes) = match digits.split_once(':') {
            Some((h, m)) => (h, m),
            None => (digits, "00"),
        };
        let number = |s: &str| {
            (s.len() == 2 && s.bytes().all(|b| b.is_ascii_digit()))
                .then(|| s.parse::<i32>().ok())
                .flatten()
        };
        match (number(hours), number(minutes)) {
            (Some(h), Some(m)) if m < 60 => {
                UtcOffset::from_seconds(sign * (h * 3600 + m * 60)).ok_or_else(|| err(at, body))
            }
            _ => Err(err(at + 1, digits)),
        }
    }
}

impl fmt::Display for UtcOffset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sign = if self.seconds < 0 { '-' } else { '+' };
        let abs = self.seconds.unsigned_abs();
        write!(f, "{sign}{:02}:{:02}", abs / 3600, abs % 3600 / 60)
    }
}

/// A throttle schedule that could not be parsed: where, and what was expected there.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid throttle schedule `{spec}`: at column {column}, expected {expected}, found `{found}`"
)]
pub struct ScheduleSpecError {
    /// The whole spec.
    pub spec: String,
    /// The 1-based column (in characters) where the problem starts.
    pub column: usize,
    /// What was expected there.
    pub expected: String,
    /// What was found.
    pub found: String,
}

impl ScheduleSpecError {
    fn new(spec: &str, byte_position: usize, expected: &str, found: &str) -> Self {
        let column = spec
            .get(..byte_position)
            .map_or(byte_position, |s| s.chars().count())
            + 1;
        ScheduleSpecError {
            spec: spec.to_owned(),
            column,
            expected: expected.to_owned(),
            found: found.to_owned(),
        }
    }
}

/// One range of a schedule, in minutes of the local day.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Window {
    start_minute: u16,
    end_minute: u16,
    rate: Rate,
}

impl Window {
    fn contains(&self, minute: u16) -> bool {
        if self.start_minute < self.end_minute {
            (self.start_minute..self.end_minute).contains(&minute)
        } else {
            minute >= self.start_minute || minute < self.end_minute
        }
    }

    /// The window as at most two plain intervals of the day.
    fn intervals(&self) -> [(u16, u16); 2] {
        if self.start_minute < self.end_minute {
            [(self.start_minute, self.end_minute), (0, 0)]
        } else {
            [(self.start_minute, MINUTES_PER_DAY), (0, self.end_minute)]
        }
    }

    fn overlaps(&self, other: &Window) -> bool {
        self.intervals().iter().any(|&(a0, a1)| {
            other
                .intervals()
                .iter()
                .any(|&(b0, b1)| a0 < a1 && b0 < b1 && a0 < b1 && b0 < a1)
        })
    }
}

/// Rates by time of day; see the module docs for the syntax.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RateSchedule {
    windows: Vec<Window>,
    rest: Rate,
}

impl RateSchedule {
    /// The most ranges a schedule holds.
    pub const WINDOWS_LIMIT: usize = 48;

    /// One rate all day.
    pub fn constant(rate: Rate) -> Self {
        RateSchedule {
            windows: Vec::new(),
            rest: rate,
        }
    }

    /// No limit at any time.
    pub fn unlimited() -> Self {
        Self::constant(Rate::Unlimited)
    }

    /// Parses a schedule such as `08:00-20:00=100Mbit/s,*=unlimited`.
    pub fn parse(spec: &str) -> Result<Self, ScheduleSpecError> {
        let mut windows: Vec<(Window, usize)> = Vec::new();
        let mut rest: Option<Rate> = None;
        let entries = split_with_offsets(spec, ',');
        let single = entries.len() == 1;
        for (entry, offset) in entries {
            let lead = entry.len() - entry.trim_start().len();
            let entry_at = offset + lead;
            let entry = entry.trim();
            let Some((lhs, rhs)) = entry.split_once('=') else {
                // A lone rate means all day; a lone range is an entry missing its rate.
                if single && !entry.is_empty() && !entry.contains(':') {
                    rest = Some(parse_rate(entry, entry_at, spec)?);
                    continue;
                }
                return Err(ScheduleSpecError::new(
                    spec,
                    entry_at,
                    "an entry `HH:MM-HH:MM=RATE` or `*=RATE`",
                    entry,
                ));
            };
            let rhs_at = entry_at + lhs.len() + 1;
            let rhs_lead = rhs.len() - rhs.trim_start().len();
            let rate = parse_rate(rhs.trim(), rhs_at + rhs_lead, spec)?;
            if lhs.trim() == "*" {
                if rest.is_some() {
                    return Err(ScheduleSpecError::new(
                        spec,
                        entry_at,
                        "at most one `*` entry",
                        entry,
                    ));
                }
                rest = Some(rate);
                continue;
            }
            let window = parse_range(lhs.trim_end(), entry_at, spec, rate)?;
            if let Some((other, _)) = windows.iter().find(|(w, _)| w.overlaps(&window)) {
                return Err(ScheduleSpecError::new(
                    spec,
                    entry_at,
                    &format!(
                        "a range that does not overlap {:02}:{:02}-{:02}:{:02}",
                        other.start_minute / 60,
                        other.start_minute % 60,
                        other.end_minute / 60,
                        other.end_minute % 60
                    ),
                    lhs.trim_end(),
                ));
            }
            if windows.len() >= Self::WINDOWS_LIMIT {
                return Err(ScheduleSpecError::new(
                    spec,
                    entry_at,
                    &format!("at most {} ranges", Self::WINDOWS_LIMIT),
                    entry,
                ));
            }
            windows.push((window, entry_at));
        }
        Ok(RateSchedule {
            windows: windows.into_iter().map(|(w, _)| w).collect(),
            rest: rest.unwrap_or(Rate::Unlimited),
        })
    }

    /// The rate in force at `minute` of the local day (0 to 1439).
    pub fn rate_at_minute(&self, minute: u16) -> Rate {
        self.windows
            .iter()
            .find(|w| w.contains(minute))
            .map_or(self.rest, |w| w.rate)
    }

    /// The rate in force at `t`, with local time `offset` from UTC.
    pub fn rate_at(&self, t: Timestamp, offset: UtcOffset) -> Rate {
        let secs = i64::try_from(t.0.as_secs()).unwrap_or(i64::MAX);
        let local = secs.saturating_add(i64::from(offset.seconds));
        let minute = local.rem_euclid(SECONDS_PER_DAY) / 60;
        self.rate_at_minute(u16::try_from(minute).unwrap_or(0))
    }
}

impl FromStr for RateSchedule {
    type Err = ScheduleSpecError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        RateSchedule::parse(s)
    }
}

/// Splits `s` at `sep`, with each part's byte offset in `s`.
fn split_with_offsets(s: &str, sep: char) -> Vec<(&str, usize)> {
    let mut out = Vec::new();
    let mut start = 0;
    for (i, c) in s.char_indices() {
        if c == sep {
            out.push((&s[start..i], start));
            start = i + c.len_utf8();
        }
    }
    out.push((&s[start..], start));
    out
}

fn parse_range(text: &str, at: usize, spec: &str, rate: Rate) -> Result<Window, ScheduleSpecError> {
    let Some((start, end)) = text.split_once('-') else {
        return Err(ScheduleSpecError::new(
            spec,
            at,
            "a time range `HH:MM-HH:MM` or `*`",
            text,
        ));
    };
    let start_minute = parse_time(start, at, spec, false)?;
    let end_at = at + start.len() + 1;
    let end_minute = parse_time(end, end_at, spec, true)?;
    if start_minute == end_minute {
        return Err(ScheduleSpecError::new(
            spec,
            end_at,
            "an end time different from the start (for all day, use `*`)",
            end,
        ));
    }
    Ok(Window {
        start_minute,
        end_minute: end_minute % MINUTES_PER_DAY,
        rate,
    })
}

/// Parses `HH:MM` into minutes of the day; `24:00` only as an end.
fn parse_time(text: &str, at: usize, spec: &str, is_end: bool) -> Result<u16, ScheduleSpecError> {
    let expected = if is_end {
        "a time HH:MM from 00:00 to 24:00"
    } else {
        "a time HH:MM from 00:00 to 23:59"
    };
    let err = || ScheduleSpecError::new(spec, at, expected, text);
    let bytes = text.as_bytes();
    if bytes.len() != 5 || bytes[2] != b':' {
        return Err(err());
    }
    let two = |s: &[u8]| -> Option<u16> {
        match s {
            [a, b] if a.is_ascii_digit() && b.is_ascii_digit() => {
                Some(u16::from(a - b'0') * 10 + u16::from(b - b'0'))
            }
            _ => None,
        }
    };
    match (two(&bytes[..2]), two(&bytes[3..])) {
        (Some(h), Some(m)) if h < 24 && m < 60 => Ok(h * 60 + m),
        (Some(24), Some(0)) if is_end => Ok(MINUTES_PER_DAY),
        _ => Err(err()),
    }
}

/// The rate units: name, then bytes per second per unit as a fraction.
const UNITS: &[(&str, u128, u128)] = &[
    ("bit/s", 1, 8),
    ("bps", 1, 8),
    ("kbit/s", 1_000, 8),
    ("Kbit/s", 1_000, 8),
    ("kbps", 1_000, 8),
    ("Mbit/s", 1_000_000, 8),
    ("Mbps", 1_000_000, 8),
    ("Gbit/s", 1_000_000_000, 8),
    ("Gbps", 1_000_000_000, 8),
    ("Tbit/s", 1_000_000_000_000, 8),
    ("Kibit/s", 1 << 10, 8),
    ("Mibit/s", 1 << 20, 8),
    ("Gibit/s", 1 << 30, 8),
    ("B/s", 1, 1),
    ("kB/s", 1_000, 1),
    ("KB/s", 1_000, 1),
    ("MB/s", 1_000_000, 1),
    ("GB/s", 1_000_000_000, 1),
    ("TB/s", 1_000_000_000_000, 1),
    ("KiB/s", 1 << 10, 1),
    ("MiB/s", 1 << 20, 1),
    ("GiB/s", 1 << 30, 1),
    ("TiB/s", 1 << 40, 1),
];

/// The most digits a rate's number may have, so that the arithmetic is exact.
const RATE_DIGITS_LIMIT: usize = 18;

/// Parses `text` (found at byte `at` of `spec`) as a rate.
fn parse_rate(text: &str, at: usize, spec: &str) -> Result<Rate, ScheduleSpecError> {
    if text.eq_ignore_ascii_case("unlimited") {
        return Ok(Rate::Unlimited);
    }
    let number_len = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit_part) = text.split_at(number_len);
    let (int, frac) = number.split_once('.').unwrap_or((number, ""));
    if int.is_empty()
        || number.matches('.').count() > 1
        || int.len() + frac.len() > RATE_DIGITS_LIMIT
    {
        return Err(ScheduleSpecError::new(
            spec,
            at,
            "a rate: `unlimited` or a number and a unit, like `100Mbit/s` or `12.5MB/s`",
            text,
        ));
    }
    let unit_at = at + number_len + (unit_part.len() - unit_part.trim_start().len());
    let unit = unit_part.trim_start();
    let Some(&(_, per_unit_num, per_unit_den)) = UNITS.iter().find(|(name, _, _)| *name == unit)
    else {
        return Err(ScheduleSpecError::new(
            spec,
            unit_at,
            "a rate unit: bit/s, kbit/s, Mbit/s, Gbit/s, Kibit/s, Mibit/s, Gibit/s, B/s, kB/s, \
             MB/s, GB/s, KiB/s, MiB/s, GiB/s (or Tbit/s, TB/s, TiB/s, bps, Mbps...)",
            unit,
        ));
    };
    // number = mantissa / 10^frac_digits, exactly.
    let mantissa: u128 = format!("{int}{frac}").parse().unwrap_or(0);
    let scale = 10u128.pow(u32::try_from(frac.len()).unwrap_or(0));
    let bytes_per_second = mantissa * per_unit_num / (scale * per_unit_den);
    match u64::try_from(bytes_per_second)
        .ok()
        .and_then(NonZeroU64::new)
    {
        Some(rate) => Ok(Rate::BytesPerSecond(rate)),
        None => Err(ScheduleSpecError::new(
            spec,
            at,
            "a rate of at least 1 B/s and below 2^64 B/s (for no limit, write `unlimited`)",
            text,
        )),
    }
}

/// How a [`ThrottleSink`] limits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ThrottleConfig {
    /// The rates by time of day.
    pub schedule: RateSchedule,
    /// Local time's offset from UTC, for the schedule.
    pub utc_offset: UtcOffset,
    /// The largest piece a transfer is charged in: smaller pieces interleave concurrent
    /// transfers more finely and follow schedule changes more closely. From
    /// [`ThrottleConfig::CHUNK_BYTES_MIN`] to [`ThrottleConfig::CHUNK_BYTES_MAX`].
    pub chunk_bytes: u64,
}

impl ThrottleConfig {
    /// The default chunk: at 100 Mbit/s, 21 ms of the link.
    pub const CHUNK_BYTES_DEFAULT: u64 = 256 << 10;
    /// The smallest chunk accepted.
    pub const CHUNK_BYTES_MIN: u64 = 4 << 10;
    /// The largest chunk accepted.
    pub const CHUNK_BYTES_MAX: u64 = 64 << 20;

    /// A config with `schedule` in UTC and the default chunk.
    pub fn new(schedule: RateSchedule) -> Self {
        ThrottleConfig {
            schedule,
            utc_offset: UtcOffset::UTC,
            chunk_bytes: Self::CHUNK_BYTES_DEFAULT,
        }
    }

    /// Parses the schedule from `spec`, in UTC, with the default chunk.
    pub fn parse(spec: &str) -> Result<Self, ScheduleSpecError> {
        Ok(Self::new(RateSchedule::parse(spec)?))
    }

    /// The same, with local time at `offset` from UTC.
    pub fn with_utc_offset(mut self, offset: UtcOffset) -> Self {
        self.utc_offset = offset;
        self
    }
}

/// What a [`ThrottleSink`] has done so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ThrottleStats {
    /// Payload bytes charged (puts and gets).
    pub bytes_charged: u64,
    /// Total time callers waited for the link, summed over callers.
    pub waited_total: Duration,
}

struct State {
    /// When the link is next free: the end of the last slot handed out.
    next_free: Timestamp,
    stats: ThrottleStats,
}

/// A sink that limits the payload bandwidth of the sink it wraps; see the module docs.
pub struct ThrottleSink {
    inner: Arc<dyn Sink>,
    clock: Arc<dyn Clock>,
    config: ThrottleConfig,
    state: Mutex<State>,
}

impl fmt::Debug for ThrottleSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ThrottleSink")
            .field("inner", &self.inner)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl ThrottleSink {
    /// Wraps `inner`, limited by `config`, reading the time and waiting on `clock`. Fails with
    /// [`SinkErrorKind::InvalidConfig`] if the chunk size is out of its bounds.
    pub fn new(
        inner: Arc<dyn Sink>,
        clock: Arc<dyn Clock>,
        config: ThrottleConfig,
    ) -> Result<Self, SinkError> {
        let chunk_bounds = ThrottleConfig::CHUNK_BYTES_MIN..=ThrottleConfig::CHUNK_BYTES_MAX;
        if !chunk_bounds.contains(&config.chunk_bytes) {
            return Err(SinkError::new(
                SinkErrorKind::InvalidConfig,
                "open",
                &inner.describe(),
                format!(
                    "throttle chunk_bytes is {}; it must be {} to {}",
                    config.chunk_bytes,
                    ThrottleConfig::CHUNK_BYTES_MIN,
                    ThrottleConfig::CHUNK_BYTES_MAX
                ),
            ));
        }
        Ok(ThrottleSink {
            inner,
            clock,
            config,
            state: Mutex::new(State {
                next_free: Timestamp::default(),
                stats: ThrottleStats::default(),
            }),
        })
    }

    /// The config.
    pub fn config(&self) -> &ThrottleConfig {
        &self.config
    }

    /// What has been done so far.
    pub fn stats(&self) -> ThrottleStats {
        lock(&self.state).stats
    }

    /// The wrapped sink.
    pub fn inner(&self) -> &Arc<dyn Sink> {
        &self.inner
    }

    /// Waits until `bytes` have passed through the link, chunk by chunk.
    async fn charge(&self, bytes: u64) {
        let mut left = bytes;
        while left > 0 {
            let chunk = left.min(self.config.chunk_bytes);
            left -= chunk;
            let (now, slot_end) = {
                let mut state = lock(&self.state);
                let now = self.clock.now();
                let start = now.max(state.next_free);
                let rate = self.config.schedule.rate_at(start, self.config.utc_offset);
                if rate == Rate::Unlimited {
                    // Nothing to wait for: do not hold a place in the queue either.
                    state.stats.bytes_charged += chunk + left;
                    return;
                }
                let end = start.plus(rate.duration_of(chunk));
                state.next_free = end;
                state.stats.bytes_charged += chunk;
                state.stats.waited_total = state.stats.waited_total.saturating_add(end.since(now));
                (now, end)
            };
            if slot_end > now {
                self.clock.sleep_until(slot_end).await;
            }
            // Let the others take their turn even when the clock does not really wait (as
            // a simulated clock does not).
            tokio::task::yield_now().await;
        }
    }
}

#[async_trait]
impl Sink for ThrottleSink {
    async fn put(&self, key: &str, data: Bytes, mode: PutMode) -> Result<(), SinkError> {
        validate_key("put", key)?;
        self.charge(data.len() as u64).await;
        self.inner.put(key, data, mode).await
    }

    async fn get(&self, key: &str) -> Result<Bytes, SinkError> {
        validate_key("get", key)?;
        let data = self.inner.get(key).await?;
        self.charge(data.len() as u64).await;
        Ok(data)
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, SinkError> {
        validate_prefix(prefix)?;
        self.inner.list(prefix).await
    }

    async fn delete(&self, key: &str) -> Result<(), SinkError> {
        validate_key("delete", key)?;
        self.inner.delete(key).await
    }

    fn describe(&self) -> String {
        format!("throttle({})", self.inner.describe())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bps(n: u64) -> Rate {
        Rate::BytesPerSecond(NonZeroU64::new(n).unwrap_or(NonZeroU64::MIN))
    }

    #[test]
    fn units_convert_exactly() -> Result<(), ScheduleSpecError> {
        for (text, bytes_per_second) in [
            ("100Mbit/s", 12_500_000),
            ("100 Mbit/s", 12_500_000),
            ("1Gbit/s", 125_000_000),
            ("1.5Gbit/s", 187_500_000),
            ("8bit/s", 1),
            ("800kbit/s", 100_000),
            ("100Mbps", 12_500_000),
            ("12.5MB/s", 12_500_000),
            ("10MB/s", 10_000_000),
            ("4KiB/s", 4096),
            ("2MiB/s", 2 << 20),
            ("1GiB/s", 1 << 30),
            ("8Mibit/s", 1 << 20),
            ("1TB/s", 1_000_000_000_000),
        ] {
            assert_eq!(text.parse::<Rate>()?, bps(bytes_per_second), "{text}");
        }
        assert_eq!("Unlimited".parse::<Rate>()?, Rate::Unlimited);
        Ok(())
    }

    #[test]
    fn ranges_wrap_midnight_and_star_is_the_rest() -> Result<(), ScheduleSpecError> {
        let s = RateSchedule::parse("22:00-06:00=1MB/s, 08:00-20:00=2MB/s, *=3MB/s")?;
        assert_eq!(s.rate_at_minute(23 * 60), bps(1_000_000));
        assert_eq!(s.rate_at_minute(0), bps(1_000_000));
        assert_eq!(s.rate_at_minute(5 * 60 + 59), bps(1_000_000));
        assert_eq!(s.rate_at_minute(6 * 60), bps(3_000_000));
        assert_eq!(s.rate_at_minute(8 * 60), bps(2_000_000));
        assert_eq!(s.rate_at_minute(20 * 60 - 1), bps(2_000_000));
        assert_eq!(s.rate_at_minute(20 * 60), bps(3_000_000));
        let no_rest = RateSchedule::parse("08:00-24:00=1MB/s")?;
        assert_eq!(no_rest.rate_at_minute(23 * 60 + 59), bps(1_000_000));
        assert_eq!(no_rest.rate_at_minute(7 * 60), Rate::Unlimited);
        assert_eq!(
            RateSchedule::parse("50MB/s")?.rate_at_minute(0),
            bps(50_000_000)
        );
        Ok(())
    }

    #[test]
    fn bad_specs_name_the_column_and_what_was_expected() {
        for (spec, column, expected) in [
            ("08:00-2x:00=100Mbit/s", 7, "a time HH:MM"),
            ("08:00-20:00=100Mbit", 16, "a rate unit"),
            ("08:00-20:00=100 furlongs/s", 17, "a rate unit"),
            ("08:00-20:00", 1, "an entry `HH:MM-HH:MM=RATE`"),
            ("08:00-20:00=fast,*=unlimited", 13, "a rate"),
            ("24:00-08:00=1MB/s", 1, "00:00 to 23:59"),
            ("08:00-08:00=1MB/s", 7, "an end time different"),
            (
                "08:00-20:00=1MB/s,19:00-21:00=2MB/s",
                19,
                "does not overlap 08:00-20:00",
            ),
            ("*=1MB/s,*=2MB/s", 9, "at most one `*`"),
            ("08:00-20:00=0MB/s", 13, "at least 1 B/s"),
            ("0800=1MB/s", 1, "a time range"),
            ("", 1, "an entry"),
        ] {
            match RateSchedule::parse(spec) {
                Ok(s) => panic!("{spec:?} parsed as {s:?}"),
                Err(e) => {
                    assert_eq!(e.column, column, "{spec:?}: {e}");
                    assert!(e.expected.contains(expected), "{spec:?}: {e}");
                    assert!(e.to_string().contains("column"), "{e}");
                }
            }
        }
    }

    #[test]
    fn utc_offsets_parse() -> Result<(), ScheduleSpecError> {
        assert_eq!(UtcOffset::parse("+02:00")?.seconds(), 7200);
        assert_eq!(UtcOffset::parse("-05:30")?.seconds(), -19800);
        assert_eq!(UtcOffset::parse("UTC+01")?.seconds(), 3600);
        assert_eq!(UtcOffset::parse("Z")?, UtcOffset::UTC);
        assert_eq!(UtcOffset::parse("UTC")?, UtcOffset::UTC);
        assert_eq!(UtcOffset::parse("-05:30")?.to_string(), "-05:30");
        for bad in ["", "+2", "+19:00", "02:00", "+02:60"] {
            assert!(UtcOffset::parse(bad).is_err(), "{bad:?}");
        }
        Ok(())
    }

    #[test]
    fn durations_round_up_to_the_nanosecond() {
        assert_eq!(
            bps(12_500_000).duration_of(12_500_000),
            Duration::from_secs(1)
        );
        assert_eq!(bps(3).duration_of(1), Duration::from_nanos(333_333_334));
        assert_eq!(Rate::Unlimited.duration_of(u64::MAX), Duration::ZERO);
    }
}

//! The tracker daemon's socket protocol: length-prefixed frames, each a JSON header and an
//! optional binary body (an `RPLBMAP1` bitmap), request then reply, one at a time per connection.
//!
//! ```text
//! off  len  field
//!   0    4  h = header length, u32 little-endian, at most HEADER_BYTES_MAX
//!   4    8  b = body length, u64 little-endian, at most BODY_BYTES_MAX
//!  12    h  header: a JSON object (a `Request` or a `Reply`)
//! 12+h   b  body: bytes the header describes (a bitmap), or nothing
//! ```

use std::io::{Read, Write};

use serde::{Deserialize, Serialize};

/// Longest JSON header.
pub const HEADER_BYTES_MAX: u32 = 64 << 10;
/// Longest body (a bitmap; sparse bitmaps of even very large disks are far smaller).
pub const BODY_BYTES_MAX: u64 = 1 << 30;

/// A request to the daemon. The body is empty except for `carry` (the sectors to carry).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Who the daemon is: replies `info`.
    Hello,
    /// Its state, read-only: replies `info`.
    Status,
    /// A copy of the current epoch's marks: replies `bitmap` with the marks as the body.
    Current,
    /// Freeze the current epoch: replies `frozen` with its marks as the body. The frozen epoch
    /// belongs to this connection: closed without a release, it is released as failed.
    Freeze,
    /// End the frozen epoch: replies `done`.
    Release {
        /// The cycle is in the cache (drop the marks) or not (put them back).
        committed: bool,
    },
    /// Put the body's sectors back into the current epoch: replies `done`.
    Carry,
    /// Mark the whole disk: replies `done`.
    MarkAll,
    /// The target applied the cycle of `epoch` and every earlier one: replies `done`.
    Acknowledged {
        /// The epoch.
        epoch: u64,
    },
    /// Persist now: replies `done`.
    Checkpoint,
}

/// What the daemon is and holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Info {
    /// The device node it tracks.
    pub device: String,
    /// `major:minor`.
    pub major: u32,
    /// See `major`.
    pub minor: u32,
    /// The device's size.
    pub disk_bytes: u64,
    /// The loop device's backing file, if any.
    pub backing_file: Option<String>,
    /// The state's generation, 32 hex digits.
    pub generation: String,
    /// The current epoch's number.
    pub epoch: u64,
    /// The frozen epoch's number, if a cycle holds one.
    pub frozen_epoch: Option<u64>,
    /// Sectors marked in the current epoch.
    pub marked_sectors: u64,
    /// Why tracking is lost, if it is.
    pub lost: Option<String>,
    /// Newest acknowledged epoch.
    pub acked_epoch: u64,
    /// Block events that marked sectors since the daemon started.
    pub change_events: u64,
    /// The daemon's process id.
    pub pid: u32,
    /// What the daemon found when it started (a clean restart, a gap, a new state).
    pub started: String,
}

/// Why a request failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The request does not fit the state (an epoch already frozen, a bitmap of another size).
    Invalid,
    /// The daemon could not do it (persisting failed, the trace reader stopped).
    Io,
}

/// A reply.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum Reply {
    /// To `hello` and `status`.
    Info(Info),
    /// To `current`: the body is the bitmap.
    Bitmap,
    /// To `freeze`: the body is the frozen bitmap.
    Frozen {
        /// The frozen epoch's number.
        epoch: u64,
        /// Tracking was lost (why): the bitmap is the whole disk.
        lost: Option<String>,
    },
    /// Done.
    Done,
    /// The request failed.
    Error {
        /// What kind of failure.
        kind: ErrorKind,
        /// What failed, for a person.
        message: String,
    },
}

/// Writes one frame.
pub fn write_frame<T: Serialize>(
    w: &mut impl Write,
    header: &T,
    body: &[u8],
) -> std::io::Result<()> {
    let head = serde_json::to_vec(header).map_err(std::io::Error::other)?;
    let mut prefix = [0u8; 12];
    prefix[0..4].copy_from_slice(&(head.len() as u32).to_le_bytes());
    prefix[4..12].copy_from_slice(&(body.len() as u64).to_le_bytes());
    w.write_all(&prefix)?;
    w.write_all(&head)?;
    w.write_all(body)?;
    w.flush()
}

/// Reads one frame; `Ok(None)` at a clean end of the stream (before a frame starts).
pub fn read_frame<T: for<'de> Deserialize<'de>>(
    r: &mut impl Read,
) -> std::io::Result<Option<(T, Vec<u8>)>> {
    let mut prefix = [0u8; 12];
    let mut got = 0;
    while got < prefix.len() {
        match r.read(&mut prefix[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the stream ended inside a frame header",
                ));
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    let head_len = u32::from_le_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]);
    let mut body_len = [0u8; 8];
    body_len.copy_from_slice(&prefix[4..12]);
    let body_len = u64::from_le_bytes(body_len);
    if head_len > HEADER_BYTES_MAX || body_len > BODY_BYTES_MAX {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!(
                "a frame of {head_len} header and {body_len} body bytes exceeds the limits \
                 ({HEADER_BYTES_MAX} and {BODY_BYTES_MAX})"
            ),
        ));
    }
    let mut head = vec![0u8; head_len as usize];
    r.read_exact(&mut head)?;
    let mut body = vec![0u8; body_len as usize];
    r.read_exact(&mut body)?;
    let header = serde_json::from_slice(&head).map_err(|e| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("a frame header is not a known message: {e}"),
        )
    })?;
    Ok(Some((header, body)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_limits_hold() -> std::io::Result<()> {
        let mut buf = Vec::new();
        write_frame(&mut buf, &Request::Release { committed: true }, b"")?;
        write_frame(&mut buf, &Request::Carry, b"bitmap bytes")?;
        let head = br#"{"op":"release","committed":true}"#;
        assert_eq!(&buf[0..4], &(head.len() as u32).to_le_bytes());
        assert_eq!(&buf[4..12], &0u64.to_le_bytes());
        assert_eq!(&buf[12..12 + head.len()], head);
        let mut r = &buf[..];
        let a: Option<(Request, Vec<u8>)> = read_frame(&mut r)?;
        assert_eq!(a, Some((Request::Release { committed: true }, Vec::new())));
        let b: Option<(Request, Vec<u8>)> = read_frame(&mut r)?;
        assert_eq!(b, Some((Request::Carry, b"bitmap bytes".to_vec())));
        let end: Option<(Request, Vec<u8>)> = read_frame(&mut r)?;
        assert_eq!(end, None);

        let mut huge = Vec::new();
        huge.extend_from_slice(&(HEADER_BYTES_MAX + 1).to_le_bytes());
        huge.extend_from_slice(&0u64.to_le_bytes());
        assert!(read_frame::<Request>(&mut &huge[..]).is_err());
        let torn = &buf[..5];
        assert!(read_frame::<Request>(&mut &torn[..]).is_err());
        let mut junk = Vec::new();
        write_frame(&mut junk, &serde_json::json!({"op": "explode"}), b"")?;
        assert!(read_frame::<Request>(&mut &junk[..]).is_err());
        Ok(())
    }
}

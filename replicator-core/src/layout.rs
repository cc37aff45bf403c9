//! Where things live in the cache: the object keys of one replicated disk.
//!
//! ```text
//! disks/<disk id>/manifests/<cycle:020>                              cycle manifest (written last)
//! disks/<disk id>/blobs/<cycle:020>/<attempt:020>/<seq:010>           blob
//! disks/<disk id>/acks/<cycle:020>                                   target's acknowledgement
//! disks/<disk id>/requests/<number:020>                              source asks for a catalog
//! disks/<disk id>/catalogs/<number:020>                              target's digest catalog
//! ```
//! Numbers are zero-padded decimals so that listing order is numeric order.

use crate::keys::DiskId;

/// The prefix of every object of `disk`.
pub fn disk_prefix(disk: &DiskId) -> String {
    format!("disks/{disk}/")
}

/// The prefix under which all manifests of `disk` are listed.
pub fn manifests_prefix(disk: &DiskId) -> String {
    format!("disks/{disk}/manifests/")
}

/// The manifest of `cycle`.
pub fn manifest_key(disk: &DiskId, cycle: u64) -> String {
    format!("disks/{disk}/manifests/{cycle:020}")
}

/// The prefix of every blob of `cycle`, all attempts.
pub fn cycle_blobs_prefix(disk: &DiskId, cycle: u64) -> String {
    format!("disks/{disk}/blobs/{cycle:020}/")
}

/// Blob `seq` of `attempt` of `cycle`.
pub fn blob_key(disk: &DiskId, cycle: u64, attempt: u64, seq: u32) -> String {
    format!("disks/{disk}/blobs/{cycle:020}/{attempt:020}/{seq:010}")
}

/// The prefix under which all acknowledgements of `disk` are listed.
pub fn acks_prefix(disk: &DiskId) -> String {
    format!("disks/{disk}/acks/")
}

/// The acknowledgement of `cycle`.
pub fn ack_key(disk: &DiskId, cycle: u64) -> String {
    format!("disks/{disk}/acks/{cycle:020}")
}

/// The prefix under which the source's resync requests are listed.
pub fn requests_prefix(disk: &DiskId) -> String {
    format!("disks/{disk}/requests/")
}

/// Resync request `number`.
pub fn request_key(disk: &DiskId, number: u64) -> String {
    format!("disks/{disk}/requests/{number:020}")
}

/// The prefix under which the target's digest catalogs are listed.
pub fn catalogs_prefix(disk: &DiskId) -> String {
    format!("disks/{disk}/catalogs/")
}

/// Digest catalog `number`.
pub fn catalog_key(disk: &DiskId, number: u64) -> String {
    format!("disks/{disk}/catalogs/{number:020}")
}

/// The number at the end of a manifest, ack, request or catalog key, if it parses.
pub fn cycle_of_key(key: &str) -> Option<u64> {
    key.rsplit('/').next()?.parse().ok()
}

/// The disk ids that have objects in the cache, from a listing of `disks/`.
pub fn disk_of_key(key: &str) -> Option<DiskId> {
    key.strip_prefix("disks/")?.split('/').next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_valid_sink_keys_and_parse_back() {
        let disk = DiskId([0xab; 16]);
        for key in [
            manifest_key(&disk, 7),
            blob_key(&disk, 7, 3, 12),
            ack_key(&disk, u64::MAX),
        ] {
            assert!(replicator_sink::validate_key("put", &key).is_ok(), "{key}");
            assert_eq!(disk_of_key(&key), Some(disk));
        }
        assert_eq!(cycle_of_key(&manifest_key(&disk, 42)), Some(42));
        assert_eq!(cycle_of_key(&ack_key(&disk, u64::MAX)), Some(u64::MAX));
        assert!(manifest_key(&disk, 9) < manifest_key(&disk, 10));
    }
}

//! Garbage collection of the cache, driven by the source's state.
//!
//! What may go, and why:
//!
//! - **acknowledged**: the manifest and blobs of a cycle the target acknowledged, beyond the newest
//!   [`GcPolicy::retain_cycles`] acknowledged cycles (kept as recovery points: a target rebuilt
//!   from its last state can re-apply them);
//! - **superseded**: a cycle that is neither pending nor acknowledged (it failed on the target and
//!   its sectors were carried into a later cycle, or it chained on one that did);
//! - **abandoned attempt**: blobs of an attempt that never wrote its manifest (the source stopped
//!   or failed mid-cycle), or of an earlier attempt of a cycle whose manifest names another one;
//! - **processed acknowledgement**: an ack of a cycle the source no longer waits for.
//!
//! Nothing pending (shipped, not yet acknowledged) or in flight is ever planned for removal, and
//! a manifest is removed only together with, and after, its blobs. The plan is computed first and
//! can be printed without deleting anything (dry run).

use std::collections::{BTreeMap, BTreeSet};

use replicator_sink::Sink;

use crate::error::Result;
use crate::format;
use crate::keys::DiskId;
use crate::layout;
use crate::state::SourceState;

/// How much to keep.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GcPolicy {
    /// Acknowledged cycles whose objects are kept, newest first. 0 keeps none.
    pub retain_cycles: u64,
}

impl Default for GcPolicy {
    fn default() -> Self {
        GcPolicy { retain_cycles: 2 }
    }
}

/// Why an object may go.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum GcReason {
    /// Its cycle was acknowledged and is older than the retained ones.
    Acknowledged,
    /// Its cycle was superseded after failing on the target.
    Superseded,
    /// It belongs to an attempt that did not commit.
    AbandonedAttempt,
    /// An acknowledgement the source has processed.
    ProcessedAck,
}

impl std::fmt::Display for GcReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            GcReason::Acknowledged => "acknowledged",
            GcReason::Superseded => "superseded",
            GcReason::AbandonedAttempt => "abandoned attempt",
            GcReason::ProcessedAck => "processed acknowledgement",
        })
    }
}

/// One object to remove.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GcItem {
    /// Its key.
    pub key: String,
    /// Its size.
    pub size_bytes: u64,
    /// Why.
    pub reason: GcReason,
}

/// What a collection would remove, blobs before manifests.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GcPlan {
    /// The objects, in removal order.
    pub items: Vec<GcItem>,
}

impl GcPlan {
    /// Total bytes the plan frees.
    pub fn bytes(&self) -> u64 {
        self.items.iter().map(|i| i.size_bytes).sum()
    }
}

/// What [`run_gc`] removed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Objects removed.
    pub removed: u64,
    /// Bytes freed.
    pub bytes: u64,
    /// Objects that could not be removed, with the error (they are retried next time).
    pub failed: Vec<(String, String)>,
}

/// Plans a collection for `disk` from the source's `state`.
pub async fn plan_gc(
    sink: &dyn Sink,
    disk: &DiskId,
    state: &SourceState,
    policy: GcPolicy,
) -> Result<GcPlan> {
    let pending: BTreeSet<u64> = state.pending.iter().map(|p| p.cycle).collect();
    let in_flight = state.in_flight.as_ref().map(|f| f.cycle);
    let live = |c: u64| pending.contains(&c) || in_flight == Some(c);

    // Committed cycles and the attempt each manifest names.
    let mut manifests: BTreeMap<u64, (String, u64, Option<u64>)> = BTreeMap::new();
    for meta in sink.list(&layout::manifests_prefix(disk)).await? {
        let Some(cycle) = layout::cycle_of_key(&meta.key) else {
            continue;
        };
        let attempt = match sink.get(&meta.key).await {
            Ok(bytes) => format::peek_header(&bytes).ok().map(|h| h.attempt),
            Err(e) if e.is_not_found() => continue,
            Err(e) => return Err(e.into()),
        };
        manifests.insert(cycle, (meta.key, meta.size_bytes, attempt));
    }
    let acknowledged: Vec<u64> = manifests
        .keys()
        .copied()
        .filter(|c| *c <= state.acked_cycle && !live(*c))
        .collect();
    let keep_from = acknowledged
        .len()
        .saturating_sub(usize::try_from(policy.retain_cycles).unwrap_or(usize::MAX));
    let retained: BTreeSet<u64> = acknowledged[keep_from..].iter().copied().collect();

    let mut blobs = Vec::new();
    let mut doomed_manifests = Vec::new();
    for meta in sink
        .list(&format!("{}blobs/", layout::disk_prefix(disk)))
        .await?
    {
        let Some((cycle, attempt)) = blob_cycle_attempt(&meta.key) else {
            continue;
        };
        let reason = match manifests.get(&cycle) {
            Some((_, _, committed)) if *committed != Some(attempt) => GcReason::AbandonedAttempt,
            Some(_) if live(cycle) || retained.contains(&cycle) || cycle >= state.next_cycle => {
                continue;
            }
            Some(_) if cycle <= state.acked_cycle => GcReason::Acknowledged,
            Some(_) => GcReason::Superseded,
            // No manifest: only the attempt in flight may still commit (the next run settles it).
            None if state
                .in_flight
                .as_ref()
                .is_some_and(|f| f.cycle == cycle && f.attempt == attempt) =>
            {
                continue;
            }
            None => GcReason::AbandonedAttempt,
        };
        blobs.push(GcItem {
            key: meta.key,
            size_bytes: meta.size_bytes,
            reason,
        });
    }
    for (cycle, (key, size, _)) in &manifests {
        if live(*cycle) || retained.contains(cycle) || *cycle >= state.next_cycle {
            continue;
        }
        let reason = if *cycle <= state.acked_cycle {
            GcReason::Acknowledged
        } else {
            GcReason::Superseded
        };
        doomed_manifests.push(GcItem {
            key: key.clone(),
            size_bytes: *size,
            reason,
        });
    }
    let mut acks = Vec::new();
    for meta in sink.list(&layout::acks_prefix(disk)).await? {
        let Some(cycle) = layout::cycle_of_key(&meta.key) else {
            continue;
        };
        if !pending.contains(&cycle)
            && cycle <= state.acked_cycle.max(state.next_cycle.saturating_sub(1))
        {
            acks.push(GcItem {
                key: meta.key,
                size_bytes: meta.size_bytes,
                reason: GcReason::ProcessedAck,
            });
        }
    }
    let mut items = blobs;
    items.extend(doomed_manifests);
    items.extend(acks);
    Ok(GcPlan { items })
}

/// The cycle and attempt in a blob key `disks/<id>/blobs/<cycle>/<attempt>/<seq>`.
fn blob_cycle_attempt(key: &str) -> Option<(u64, u64)> {
    let mut parts = key.rsplit('/');
    let _seq = parts.next()?;
    let attempt = parts.next()?.parse().ok()?;
    let cycle = parts.next()?.parse().ok()?;
    Some((cycle, attempt))
}

/// Removes what `plan` lists, in order. Failures are reported, not fatal: they are retried by the
/// next collection.
pub async fn run_gc(sink: &dyn Sink, plan: &GcPlan) -> GcReport {
    let mut report = GcReport::default();
    for item in &plan.items {
        match sink.delete(&item.key).await {
            Ok(()) => {
                report.removed += 1;
                report.bytes += item.size_bytes;
            }
            Err(e) => report.failed.push((item.key.clone(), e.to_string())),
        }
    }
    report
}

//! The primary's side of a replication session as a sans-IO state machine.
//!
//! One [`PrimarySession`] lives for one session (one stream to the
//! secondary). It decides what goes on the stream and in which order:
//! journal records in sequence order, copy chunks (initial copy, resync)
//! each placed after every record it reflects and before any newer one, the
//! flush requests clients wait for, and COPY_DONE once every chunk is
//! durable. It tracks the secondary's acks ([`Shipper`]) and the copy
//! window, and when the session ends it hands the copy chunks that were not
//! made durable back to the dirty bitmaps.
//!
//! The daemon feeds it the journal's progress, the flushes clients asked
//! for, acks, and the copy chunks it read; it performs the [`Transmit`]s and
//! [`CopyStep::Read`]s it gets back. [`check_resume`] is the divergence
//! check at session start.

use std::collections::{BTreeMap, BTreeSet};

use crate::bitmap::DirtyBitmap;
use crate::pb;
use crate::record::Record;
use crate::ship::{AckUpdate, ShipError, Shipper};

/// Tunables of a primary session.
#[derive(Debug, Clone, Copy)]
pub struct PrimaryConfig {
    /// Largest copy chunk (bytes).
    pub copy_chunk: u64,
    /// Copy bytes sent but not yet durable on the secondary, at least, for
    /// each kind of chunk (data, and hashes, counted by the bytes they
    /// stand for); the windows grow on long links:
    /// [`PrimarySession::on_copy_interval`].
    pub copy_window: u64,
    /// The most the copy window grows to.
    pub copy_window_max: u64,
    /// Send each chunk as its hashes first ([`CopyStep::Read`] `hash`, one
    /// digest per bitmap chunk); the data follows only for the bitmap
    /// chunks the secondary finds different.
    pub copy_by_hash: bool,
    /// Chunks being read or read and waiting to be sent, at most (reads
    /// overlap: the disk and the hashing stay busy).
    pub copy_reads: usize,
}

/// The secondary cannot resume from this journal.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the secondary resumes after record {peer_durable}, but this journal holds records {oldest}..={last}: the sites diverged")]
pub struct Diverged {
    /// Where the secondary resumes.
    pub peer_durable: u64,
    /// Oldest record the journal holds (`last + 1` when empty).
    pub oldest: u64,
    /// Newest record journaled.
    pub last: u64,
}

/// Session start: the secondary resumes after `peer_durable`; the journal
/// holds records `oldest..=last`. Shipping can resume only if the secondary
/// is not ahead of the journal and the journal still holds every record
/// after its resume point.
pub fn check_resume(peer_durable: u64, oldest: u64, last: u64) -> Result<(), Diverged> {
    if peer_durable > last || peer_durable + 1 < oldest {
        return Err(Diverged { peer_durable, oldest, last });
    }
    Ok(())
}

/// Something to put on the stream.
#[derive(Debug, Clone, PartialEq)]
pub enum Transmit {
    /// Journal record `seq` (the daemon fetches it from its cache or the
    /// journal).
    Record(u64),
    /// A copy chunk.
    Copy(Record),
    /// Ask the secondary to make everything through `seq` durable.
    Flush(u64),
    /// Every copy chunk is durable on the secondary and the stream holds
    /// every record through `seq`: the secondary may call itself consistent
    /// once those are durable too.
    CopyDone(u64),
    /// Records after `seq` follow writes tracked only in the bitmaps (see
    /// [`PrimarySession::on_gap`]).
    ResyncGap(u64),
}

/// What the copy should do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyStep {
    /// Read `len` bytes at `offset` of volume `volume` under a read barrier
    /// (no write to the range in flight) and report the chunk with
    /// [`PrimarySession::on_copy_read`], tagged with `copy_index` and the
    /// newest journaled seq at the barrier. The range is already cleared
    /// from the bitmap.
    Read {
        /// Volume index.
        volume: u32,
        /// Offset.
        offset: u64,
        /// Length.
        len: u64,
        /// Its copy index.
        copy_index: u64,
        /// Send the chunk as its hash ([`RecordOp::CopyHash`](crate::record::RecordOp::CopyHash)), not its
        /// data.
        hash: bool,
    },
    /// Nothing to copy now (or [`PrimaryConfig::copy_reads`] chunks are
    /// being read or wait to be sent).
    Idle,
    /// The copy window is full: wait for acks.
    WindowFull,
    /// Nothing left to copy.
    Finished,
}

/// What an ack changed, for the daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Acked {
    /// The shipper's view.
    pub update: AckUpdate,
    /// Copy bytes that became durable on the secondary with this ack.
    pub copy_bytes: u64,
    /// Copy chunks left the window (durable, or some spans to send again
    /// as data): the copy can go on.
    pub copy_progress: bool,
}

/// The primary end of one replication session.
#[derive(Debug)]
pub struct PrimarySession {
    config: PrimaryConfig,
    shipper: Shipper,
    flush_wanted: u64,
    flush_sent: u64,
    copy_index: u64,
    /// Next bitmap chunk to look at: (volume, chunk).
    cursor: (usize, u64),
    /// Chunks sent or being read, not yet durable, by copy index.
    copy_inflight: BTreeMap<u64, InflightChunk>,
    /// Hash-only chunks the secondary found different: back to the bitmap
    /// at the next [`PrimarySession::next_copy`], then sent as data.
    mismatched: Vec<(u32, u64, u64)>,
    /// Bitmap chunks (volume, chunk) to send as data, not as a hash.
    data_needed: BTreeSet<(u32, u64)>,
    /// Recent bitmap chunks sent as hashes, and how many of them differed
    /// (halved as they grow: a moving window). When most differ (a fresh
    /// secondary), hashing first only costs a round trip and a read, so
    /// chunks go as data, with a hash probe now and then.
    hashes_sent: u64,
    hashes_missed: u64,
    /// Chunks handed out for reading, by copy index: `None` while being
    /// read, then the record, which is sent once every record it reflects
    /// is. Sent in copy index order.
    reads: BTreeMap<u64, Option<Record>>,
    copy_finished: bool,
    copy_done_sent: bool,
    /// [`PrimarySession::on_gap`] not yet on the stream.
    gap_unsent: Option<u64>,
    /// Copy bytes sent but not yet durable, at most: for data chunks and
    /// for hash chunks (see [`PrimarySession::on_copy_interval`]).
    windows: [CopyWindow; 2],
    /// Newest copy chunk put on the stream (chunks go in copy index order).
    copy_sent: u64,
}

/// The copy window of one kind of chunk: data, or hashes.
#[derive(Debug, Clone, Copy)]
struct CopyWindow {
    /// Chunk bytes sent but not yet durable, at most.
    size: u64,
    /// Chunk bytes made durable since the last
    /// [`PrimarySession::on_copy_interval`].
    durable: u64,
}

/// Index into [`PrimarySession::windows`].
fn window_of(hash: bool) -> usize {
    usize::from(hash)
}

/// A copy chunk sent (or being read), not yet durable on the secondary.
#[derive(Debug, Clone, Copy)]
struct InflightChunk {
    volume: u32,
    offset: u64,
    len: u64,
    /// Bytes of it the secondary reported different (sent again as data).
    missed: u64,
    /// Sent as hashes, not data.
    hash: bool,
    /// Its bitmap's granularity: one hash each, so a differing span is
    /// whole granules (the volume's last may be shorter).
    granule: u64,
}

impl PrimarySession {
    /// A session whose secondary resumes after `peer_durable`, with records
    /// journaled through `last` (check [`check_resume`] first).
    pub fn new(config: PrimaryConfig, peer_durable: u64, last: u64) -> Self {
        PrimarySession {
            config,
            shipper: Shipper::new(peer_durable, last),
            flush_wanted: 0,
            flush_sent: 0,
            copy_index: 0,
            cursor: (0, 0),
            copy_inflight: BTreeMap::new(),
            mismatched: Vec::new(),
            data_needed: BTreeSet::new(),
            hashes_sent: 0,
            hashes_missed: 0,
            reads: BTreeMap::new(),
            copy_finished: false,
            copy_done_sent: false,
            gap_unsent: None,
            windows: [CopyWindow { size: config.copy_window, durable: 0 }; 2],
            copy_sent: 0,
        }
    }

    /// Adapts the copy window to the link, every interval of the daemon's
    /// choosing (at least a round trip): `rtt` is the path's round-trip
    /// time, `elapsed` the time since the last call. A chunk stays in the
    /// window for a round trip plus the secondary's write and sync, so a
    /// fixed window caps the copy at about window / RTT (16 MiB over a
    /// 100 ms link: 168 MB/s, a tenth of a 10 Gbit/s link). The window
    /// becomes twice what the copy made durable per round trip over the
    /// interval (the bandwidth-delay product at the rate it reached, with
    /// room to grow), within [`PrimaryConfig::copy_window`] and
    /// [`PrimaryConfig::copy_window_max`], and shrinks by at most half per
    /// interval. Where the round trip is short against the secondary's
    /// sync (a metro link, loopback) it stays at the floor: there a larger
    /// window would only queue more copy data ahead of the records.
    ///
    /// Data chunks and hash chunks have a window each: a hash chunk crosses
    /// the link as a few digests, so what hash chunks made durable says
    /// nothing of the link's bandwidth (a resync of mostly identical sites
    /// would otherwise open a window that the data chunks of the first
    /// region that differs then fill, queueing far more than the link's
    /// bandwidth-delay product ahead of the records).
    pub fn on_copy_interval(&mut self, rtt: std::time::Duration, elapsed: std::time::Duration) {
        let (floor, max) = (self.config.copy_window, self.config.copy_window_max.max(self.config.copy_window));
        for w in &mut self.windows {
            let durable = std::mem::take(&mut w.durable);
            if elapsed.is_zero() {
                continue;
            }
            let per_rtt = durable as f64 * rtt.as_secs_f64() / elapsed.as_secs_f64();
            let target = (2.0 * per_rtt).min(max as f64) as u64;
            w.size = target.max(w.size / 2).clamp(floor, max);
        }
    }

    /// Copy bytes sent but not yet durable on the secondary, at most, now:
    /// of data chunks, and of hash chunks.
    pub fn copy_windows(&self) -> (u64, u64) {
        (self.windows[window_of(false)].size, self.windows[window_of(true)].size)
    }

    /// Writes after record `seq` go only to the dirty bitmaps (the journal
    /// filled), or did while the resync they need is still pending: the
    /// secondary hears it before any later record, so that it preserves its
    /// consistent image and calls itself inconsistent before applying one.
    /// A copy that had finished is not finished any more: the regions of
    /// those writes are not copied yet, and the COPY_DONE that follows the
    /// gap on the stream is what ends it on the secondary.
    pub fn on_gap(&mut self, seq: u64) {
        self.gap_unsent = Some(self.gap_unsent.map_or(seq, |g| g.min(seq)));
        self.copy_finished = false;
    }

    /// Every record through `through` is in the journal.
    pub fn on_journaled(&mut self, through: u64) {
        self.shipper.on_appended(through);
    }

    /// Clients wait for everything through `seq` to be durable on the
    /// secondary.
    pub fn on_flush_wanted(&mut self, seq: u64) {
        self.flush_wanted = self.flush_wanted.max(seq);
    }

    /// The next thing to send, in stream order; `None` when nothing is due.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        if let Some(gap) = self.gap_unsent.take() {
            return Some(Transmit::ResyncGap(gap));
        }
        let sent = self.shipper.sent_through();
        // A chunk goes right after the records it reflects, before any
        // newer record that may overlap it (the daemon holds writes to its
        // range off until it is on the stream).
        if let Some(next) = self.reads.first_entry() {
            if next.get().as_ref().is_some_and(|c| c.seq <= sent) {
                let chunk = next.remove();
                self.copy_sent = chunk.as_ref().map_or(self.copy_sent, |c| c.copy_index);
                return chunk.map(Transmit::Copy);
            }
        }
        // A flush request and COPY_DONE go as soon as the records they
        // name are on the stream, ahead of newer records: on a link that
        // stays busy, "when nothing else is due" may never come (the
        // secondary would stay inconsistent, its preserved image the one a
        // failover rolls back to, long after the copy ended).
        if self.flush_wanted > self.flush_sent && sent >= self.flush_wanted {
            self.flush_sent = self.flush_wanted;
            return Some(Transmit::Flush(self.flush_wanted));
        }
        if self.copy_finished && !self.copy_done_sent && self.reads.is_empty() {
            self.copy_done_sent = true;
            return Some(Transmit::CopyDone(sent));
        }
        self.shipper.next_to_send().map(Transmit::Record)
    }

    /// Picks the next dirty run of the bitmaps to copy (when `copying`: a
    /// copy or resync is due and the group is not tracking writes in the
    /// bitmap instead of the journal), clears it there and counts it in
    /// flight.
    pub fn next_copy(&mut self, bitmaps: &mut [DirtyBitmap], copying: bool) -> CopyStep {
        for (vol, off, len) in self.mismatched.drain(..) {
            if let Some(b) = bitmaps.get_mut(vol as usize) {
                b.set_range(off, len);
                let g = b.granularity();
                for c in off / g..(off + len).div_ceil(g) {
                    self.data_needed.insert((vol, c));
                }
            }
        }
        if !copying || self.reads.len() >= self.config.copy_reads.max(1) {
            return CopyStep::Idle;
        }
        while let Some(b) = bitmaps.get(self.cursor.0) {
            if let Some(first) = b.next_dirty(self.cursor.1) {
                let volume = self.cursor.0 as u32;
                let granule = b.granularity();
                let per = (self.config.copy_chunk / granule).max(1);
                // A run of up to `copy_chunk`, as data or as one hash per
                // bitmap chunk (a mismatch then resends only that chunk).
                let by_hash = self.config.copy_by_hash && (self.hashes_pay() || self.copy_index % 16 == 15);
                let hash = by_hash && !self.data_needed.contains(&(volume, first));
                let inflight: u64 = self.copy_inflight.values().filter(|c| c.hash == hash).map(|c| c.len).sum();
                if inflight >= self.windows[window_of(hash)].size {
                    return CopyStep::WindowFull;
                }
                let same_kind =
                    |c: u64| b.is_chunk_dirty(c) && (!by_hash || self.data_needed.contains(&(volume, c)) != hash);
                let mut last = first;
                while last + 1 < first + per && same_kind(last + 1) {
                    last += 1;
                }
                if hash {
                    self.hashes_sent += last - first + 1;
                    if self.hashes_sent >= 1024 {
                        self.hashes_sent /= 2;
                        self.hashes_missed /= 2;
                    }
                }
                let (offset, _) = b.chunk_range(first);
                let (lo, ll) = b.chunk_range(last);
                for c in first..=last {
                    self.data_needed.remove(&(volume, c));
                }
                self.cursor.1 = last + 1;
                if let Some(b) = bitmaps.get_mut(volume as usize) {
                    for c in first..=last {
                        b.clear_chunk(c);
                    }
                }
                let len = lo + ll - offset;
                self.copy_index += 1;
                self.copy_inflight
                    .insert(self.copy_index, InflightChunk { volume, offset, len, missed: 0, hash, granule });
                self.reads.insert(self.copy_index, None);
                self.copy_finished = false;
                self.copy_done_sent = false;
                return CopyStep::Read { volume, offset, len, copy_index: self.copy_index, hash };
            }
            self.cursor = (self.cursor.0 + 1, 0);
        }
        // Wrap around once: regions may have been re-dirtied behind the cursor.
        self.cursor = (0, 0);
        if bitmaps.iter().any(|b| !b.is_clean()) {
            return CopyStep::Idle;
        }
        if self.copy_inflight.is_empty() && self.mismatched.is_empty() {
            self.copy_finished = true;
            CopyStep::Finished
        } else {
            CopyStep::WindowFull
        }
    }

    /// Whether sending chunks as hashes first saves more than it costs:
    /// until 8 have been tried, or while at most 3 in 4 differ.
    fn hashes_pay(&self) -> bool {
        self.hashes_sent < 8 || self.hashes_missed * 4 <= self.hashes_sent * 3
    }

    /// The chunk from [`CopyStep::Read`] was read (`record.seq`: the newest
    /// journaled seq at its read barrier, taken in copy index order;
    /// `record.copy_index` as handed out). It is sent once every record
    /// through its seq is, and after every chunk handed out before it.
    pub fn on_copy_read(&mut self, record: Record) {
        if let Some(slot) = self.reads.get_mut(&record.copy_index) {
            *slot = Some(record);
        }
    }

    /// Reading the chunk failed: it goes back to the bitmap.
    pub fn on_copy_read_failed(&mut self, copy_index: u64, bitmaps: &mut [DirtyBitmap]) {
        self.reads.remove(&copy_index);
        if let Some(c) = self.copy_inflight.remove(&copy_index) {
            if let Some(b) = bitmaps.get_mut(c.volume as usize) {
                b.set_range(c.offset, c.len);
            }
        }
    }

    /// An ack from the secondary.
    pub fn on_ack(&mut self, ack: &pb::Ack) -> Result<Acked, ShipError> {
        // Chunks go on the stream in copy index order: an ack of one not
        // sent yet (still being read) would take it out of the bitmaps.
        if ack.copy_durable > self.copy_sent {
            return Err(ShipError::AckBeyondSent {
                field: "copy_durable",
                got: ack.copy_durable,
                sent: self.copy_sent,
            });
        }
        // Bytes each chunk is reported different in, with this ack.
        let mut missed: std::collections::HashMap<u64, u64> = std::collections::HashMap::new();
        for m in &ack.copy_mismatch {
            if m.copy_index > self.copy_sent {
                return Err(ShipError::AckBeyondSent {
                    field: "copy_mismatch",
                    got: m.copy_index,
                    sent: self.copy_sent,
                });
            }
            // A chunk no longer in flight was made durable or handed back
            // already; one in flight must contain the span.
            if let Some(c) = self.copy_inflight.get(&m.copy_index) {
                let inside = m.length > 0
                    && m.offset >= c.offset
                    && m.offset.checked_add(m.length).is_some_and(|end| end <= c.offset + c.len);
                // Whole granules (one hash each), each reported once: a
                // peer repeating spans would grow the list of spans to
                // send again without bound.
                let g = c.granule.max(1);
                let aligned =
                    m.offset % g == 0 && (m.length % g == 0 || m.offset.saturating_add(m.length) == c.offset + c.len);
                let total = missed.entry(m.copy_index).or_insert(c.missed);
                *total = total.saturating_add(m.length);
                if !inside || !aligned || *total > c.len {
                    return Err(ShipError::MismatchOutsideChunk {
                        copy_index: m.copy_index,
                        offset: m.offset,
                        length: m.length,
                    });
                }
            }
        }
        let update = self.shipper.on_ack(ack)?;
        for m in &ack.copy_mismatch {
            if let Some(c) = self.copy_inflight.get_mut(&m.copy_index) {
                c.missed = c.missed.saturating_add(m.length).min(c.len);
                self.mismatched.push((c.volume, m.offset, m.length));
                self.hashes_missed += 1;
            }
        }
        let rest = self.copy_inflight.split_off(&ack.copy_durable.saturating_add(1));
        let done = std::mem::replace(&mut self.copy_inflight, rest);
        // Spans that differed are counted when their data is durable.
        let copy_bytes = done.values().map(|c| c.len - c.missed).sum();
        for c in done.values() {
            let w = &mut self.windows[window_of(c.hash)];
            w.durable = w.durable.saturating_add(c.len - c.missed);
        }
        Ok(Acked { update, copy_bytes, copy_progress: !done.is_empty() || !ack.copy_mismatch.is_empty() })
    }

    /// The session is over: chunks not yet durable on the secondary go
    /// back into the bitmaps.
    pub fn end(self, bitmaps: &mut [DirtyBitmap]) {
        let inflight = self.copy_inflight.into_values().map(|c| (c.volume, c.offset, c.len));
        for (vol, off, len) in inflight.chain(self.mismatched) {
            if let Some(b) = bitmaps.get_mut(vol as usize) {
                b.set_range(off, len);
            }
        }
    }

    /// Copy chunks sent (or being read) and not yet durable on the
    /// secondary: (volume, offset, len).
    pub fn copy_inflight(&self) -> impl Iterator<Item = (u32, u64, u64)> + '_ {
        self.copy_inflight.values().map(|c| (c.volume, c.offset, c.len)).chain(self.mismatched.iter().copied())
    }

    /// Whether every copy chunk is durable and none is left.
    pub fn copy_idle(&self) -> bool {
        self.copy_inflight.is_empty() && self.mismatched.is_empty() && self.reads.is_empty()
    }

    /// Whether the secondary's reply to COPY_DONE completes the copy now:
    /// the copy is idle and no chunk was handed out since the last
    /// COPY_DONE went out. A chunk after it (the journal filled again, and
    /// bitmap-mode writes started the next copy before the reply came)
    /// belongs to a later copy, which sends its own COPY_DONE.
    pub fn copy_done_answered(&self) -> bool {
        self.copy_idle() && self.copy_done_sent
    }

    /// The secondary's acknowledged progress.
    pub fn shipper(&self) -> &Shipper {
        &self.shipper
    }

    /// Newest record put on the stream.
    pub fn sent_through(&self) -> u64 {
        self.shipper.sent_through()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::record::RecordOp;

    const CONFIG: PrimaryConfig = PrimaryConfig {
        copy_chunk: 1 << 20,
        copy_window: 2 << 20,
        copy_window_max: 2 << 20,
        copy_by_hash: false,
        copy_reads: 1,
    };

    fn copy(seq: u64, index: u64, offset: u64) -> Record {
        let mut r = Record::with_payload(RecordOp::Copy, seq, 0, offset, 1, Bytes::from(vec![1u8; 4096]), false);
        r.copy_index = index;
        r
    }

    #[test]
    fn a_resync_gap_goes_out_before_any_later_record() {
        let mut s = PrimarySession::new(CONFIG, 0, 0);
        s.on_gap(3);
        s.on_gap(5);
        assert_eq!(s.poll_transmit(), Some(Transmit::ResyncGap(3)));
        assert_eq!(s.poll_transmit(), None);
    }

    #[test]
    fn no_copy_done_follows_a_gap_until_the_copy_runs_again() {
        let mut s = PrimarySession::new(CONFIG, 0, 0);
        let mut bitmaps = vec![DirtyBitmap::new(4 << 20, 64 << 10)];
        s.on_journaled(2);
        assert_eq!(s.next_copy(&mut bitmaps, true), CopyStep::Finished);
        // The journal fills before COPY_DONE is on the stream: writes after
        // record 2 are only in the bitmap, so this copy does not cover them.
        s.on_gap(2);
        bitmaps[0].set_range(0, 4096);
        assert_eq!(s.poll_transmit(), Some(Transmit::ResyncGap(2)));
        assert_eq!(s.poll_transmit(), Some(Transmit::Record(1)));
        assert_eq!(s.poll_transmit(), Some(Transmit::Record(2)));
        assert_eq!(s.poll_transmit(), None, "a COPY_DONE here would end the resync of the gap on the secondary");
        // Bitmap mode: no copy.
        assert_eq!(s.next_copy(&mut bitmaps, false), CopyStep::Idle);
        assert_eq!(s.poll_transmit(), None);
        // Once the regions are copied and durable, COPY_DONE goes.
        let CopyStep::Read { copy_index, .. } = s.next_copy(&mut bitmaps, true) else { panic!() };
        s.on_copy_read(copy(2, copy_index, 0));
        assert!(matches!(s.poll_transmit(), Some(Transmit::Copy(_))));
        let ack = pb::Ack { received_seq: 2, durable_seq: 2, copy_durable: copy_index, ..Default::default() };
        s.on_ack(&ack).unwrap();
        assert_eq!(s.next_copy(&mut bitmaps, true), CopyStep::Finished);
        assert_eq!(s.poll_transmit(), Some(Transmit::CopyDone(2)));
    }

    #[test]
    fn resume_needs_the_records_after_the_peer() {
        assert!(check_resume(10, 5, 20).is_ok());
        assert!(check_resume(20, 21, 20).is_ok());
        assert_eq!(check_resume(21, 5, 20), Err(Diverged { peer_durable: 21, oldest: 5, last: 20 }));
        assert!(check_resume(3, 5, 20).is_err());
    }

    #[test]
    fn a_copy_chunk_goes_after_the_records_it_reflects_and_before_newer_ones() {
        let mut s = PrimarySession::new(CONFIG, 0, 0);
        let mut bitmaps = vec![DirtyBitmap::new(4 << 20, 64 << 10)];
        bitmaps[0].set_range(0, 128 << 10);
        let CopyStep::Read { copy_index, offset, len, .. } = s.next_copy(&mut bitmaps, true) else { panic!() };
        assert_eq!((offset, len), (0, 128 << 10));
        assert!(bitmaps[0].is_clean());
        s.on_journaled(3);
        // The chunk was read after record 2 was journaled.
        s.on_copy_read(copy(2, copy_index, 0));
        assert_eq!(s.poll_transmit(), Some(Transmit::Record(1)));
        assert_eq!(s.poll_transmit(), Some(Transmit::Record(2)));
        assert!(matches!(s.poll_transmit(), Some(Transmit::Copy(c)) if c.seq == 2));
        assert_eq!(s.poll_transmit(), Some(Transmit::Record(3)));
        assert_eq!(s.poll_transmit(), None);
        // Done once it is durable on the secondary.
        assert_eq!(s.next_copy(&mut bitmaps, true), CopyStep::WindowFull);
        let ack = pb::Ack {
            received_seq: 3,
            applied_seq: 3,
            durable_seq: 3,
            copy_durable: 1,
            checkpoint_seq: 3,
            ..Default::default()
        };
        assert_eq!(s.on_ack(&ack).unwrap().copy_bytes, 128 << 10);
        assert_eq!(s.next_copy(&mut bitmaps, true), CopyStep::Finished);
        assert_eq!(s.poll_transmit(), Some(Transmit::CopyDone(3)));
        assert_eq!(s.poll_transmit(), None);
    }

    /// Every 64 KiB span of a chunk, reported different.
    fn spans_differ(copy_index: u64, offset: u64, len: u64) -> Vec<pb::CopyMismatch> {
        (offset..offset + len)
            .step_by(64 << 10)
            .map(|o| pb::CopyMismatch { copy_index, offset: o, length: 64 << 10 })
            .collect()
    }

    /// Sends chunks until the window is full, acking each one durable
    /// (hash chunks: every span a mismatch when `differ`). Returns (hash,
    /// data) chunks sent.
    fn copy_all(s: &mut PrimarySession, bitmaps: &mut [DirtyBitmap], differ: bool) -> (u64, u64) {
        let (mut hashes, mut data) = (0, 0);
        for _ in 0..10_000 {
            let step = s.next_copy(bitmaps, true);
            if step == CopyStep::Finished {
                break;
            }
            let CopyStep::Read { copy_index, hash, offset, len, .. } = step else { continue };
            s.on_copy_read(copy(0, copy_index, 0));
            let _ = s.poll_transmit();
            let mismatch = if hash && differ { spans_differ(copy_index, offset, len) } else { Vec::new() };
            if hash {
                hashes += 1;
            } else {
                data += 1;
            }
            let ack = pb::Ack { copy_durable: copy_index, copy_mismatch: mismatch, ..Default::default() };
            s.on_ack(&ack).unwrap();
        }
        (hashes, data)
    }

    /// The reply to a COPY_DONE completes the copy only while nothing was
    /// copied after it: once the next copy handed out a chunk, only that
    /// copy's COPY_DONE does (the secondary waits for it).
    #[test]
    fn a_copy_done_reply_completes_only_the_copy_it_answers() {
        let mut bitmaps = vec![DirtyBitmap::new(8 << 20, 64 << 10)];
        let mut s = PrimarySession::new(CONFIG, 0, 0);
        bitmaps[0].set_range(0, 64 << 10);
        copy_all(&mut s, &mut bitmaps, false);
        assert!(matches!(s.next_copy(&mut bitmaps, true), CopyStep::Finished));
        assert!(std::iter::from_fn(|| s.poll_transmit()).any(|t| matches!(t, Transmit::CopyDone(_))));
        assert!(s.copy_done_answered());
        // A gap, bitmap-mode writes, and the next copy's chunk, durable
        // before the reply to the first COPY_DONE comes.
        s.on_gap(0);
        bitmaps[0].set_range(1 << 20, 64 << 10);
        let CopyStep::Read { copy_index, .. } = s.next_copy(&mut bitmaps, true) else { panic!() };
        s.on_copy_read(copy(0, copy_index, 0));
        let _ = std::iter::from_fn(|| s.poll_transmit()).count();
        s.on_ack(&pb::Ack { copy_durable: copy_index, ..Default::default() }).unwrap();
        assert!(bitmaps[0].is_clean() && s.copy_idle());
        assert!(!s.copy_done_answered(), "the reply answers the first copy, not this one");
        assert!(matches!(s.next_copy(&mut bitmaps, true), CopyStep::Finished));
        assert!(std::iter::from_fn(|| s.poll_transmit()).any(|t| matches!(t, Transmit::CopyDone(_))));
        assert!(s.copy_done_answered());
    }

    #[test]
    fn chunks_go_as_hashes_and_only_mismatches_follow_as_data() {
        let config = PrimaryConfig { copy_by_hash: true, ..CONFIG };
        let mut bitmaps = vec![DirtyBitmap::new(8 << 20, 64 << 10)];
        // Identical sites: 1 MiB runs as one hash per 64 KiB bitmap chunk,
        // no data.
        let mut s = PrimarySession::new(config, 0, 0);
        bitmaps[0].set_all();
        assert_eq!(copy_all(&mut s, &mut bitmaps, false), (8, 0));
        assert!(bitmaps[0].is_clean() && s.copy_idle());
        // A fresh secondary: the first run is hashed and comes back as data;
        // then hashing stops paying and chunks go as data (1 MiB runs),
        // with a hash probe every 16.
        let mut s = PrimarySession::new(config, 0, 0);
        bitmaps[0].set_all();
        let (hashes, data) = copy_all(&mut s, &mut bitmaps, true);
        assert!(bitmaps[0].is_clean() && s.copy_idle());
        assert!(hashes <= 2, "{hashes} hash runs");
        assert!(data <= 8 + 2, "{data} data chunks: 1 MiB runs");
        // Mismatches count as "in flight" until sent again, and a session
        // ending returns them to the bitmap.
        let mut s = PrimarySession::new(config, 0, 0);
        bitmaps[0].set_range(0, 1 << 20);
        let CopyStep::Read { copy_index, hash: true, len, .. } = s.next_copy(&mut bitmaps, true) else { panic!() };
        assert_eq!(len, 1 << 20);
        s.on_copy_read(copy(0, copy_index, 0));
        let _ = s.poll_transmit();
        let one = pb::CopyMismatch { copy_index, offset: 128 << 10, length: 64 << 10 };
        let ack = pb::Ack { copy_durable: copy_index, copy_mismatch: vec![one], ..Default::default() };
        assert_eq!(s.on_ack(&ack).unwrap().copy_bytes, 15 * (64 << 10), "the matching spans are done");
        assert_eq!(s.copy_inflight().collect::<Vec<_>>(), vec![(0, 128 << 10, 64 << 10)]);
        assert!(!s.copy_idle());
        let never = pb::CopyMismatch { copy_index: copy_index + 1, ..one };
        let bad = pb::Ack { copy_durable: copy_index, copy_mismatch: vec![never], ..Default::default() };
        assert!(s.on_ack(&bad).is_err(), "a mismatch for a chunk never sent");
        s.end(&mut bitmaps);
        assert_eq!(bitmaps[0].dirty_bytes(), 64 << 10);
        // The one differing span goes again, as data.
        let mut s = PrimarySession::new(config, 0, 0);
        bitmaps[0].set_range(0, 1 << 20);
        let CopyStep::Read { copy_index, .. } = s.next_copy(&mut bitmaps, true) else { panic!() };
        s.on_copy_read(copy(0, copy_index, 0));
        let _ = s.poll_transmit();
        let outside = pb::CopyMismatch { copy_index, offset: 1 << 20, length: 64 << 10 };
        let bad = pb::Ack { copy_mismatch: vec![outside], ..Default::default() };
        assert!(
            matches!(s.on_ack(&bad), Err(ShipError::MismatchOutsideChunk { .. })),
            "a span outside its chunk is a protocol error"
        );
        let unaligned = pb::CopyMismatch { copy_index, offset: 100, length: 64 << 10 };
        let bad = pb::Ack { copy_mismatch: vec![unaligned], ..Default::default() };
        assert!(s.on_ack(&bad).is_err(), "a span not of whole granules is a protocol error");
        let twice = pb::Ack { copy_mismatch: vec![one; 17], ..Default::default() };
        assert!(s.on_ack(&twice).is_err(), "more bytes reported different than the chunk holds");
        let ack = pb::Ack { copy_mismatch: vec![one], ..Default::default() };
        s.on_ack(&ack).unwrap();
        // (The cursor wraps around once first: the span is behind it.)
        assert_eq!(s.next_copy(&mut bitmaps, true), CopyStep::Idle);
        let step = s.next_copy(&mut bitmaps, true);
        assert!(
            matches!(step, CopyStep::Read { offset, len, hash: false, .. } if offset == 128 << 10 && len == 64 << 10),
            "{step:?}"
        );
    }

    #[test]
    fn overlapping_reads_are_sent_in_copy_index_order() {
        let config = PrimaryConfig { copy_reads: 3, copy_window: 16 << 20, ..CONFIG };
        let mut s = PrimarySession::new(config, 0, 0);
        let mut bitmaps = vec![DirtyBitmap::new(8 << 20, 64 << 10)];
        bitmaps[0].set_all();
        let mut handed = Vec::new();
        while let CopyStep::Read { copy_index, offset, .. } = s.next_copy(&mut bitmaps, true) {
            handed.push((copy_index, offset));
        }
        assert_eq!(handed.len(), 3, "at most copy_reads chunks at once");
        assert_eq!(s.next_copy(&mut bitmaps, true), CopyStep::Idle);
        // The later reads finish first: nothing goes before the first.
        s.on_journaled(1);
        s.on_copy_read(copy(1, handed[2].0, handed[2].1));
        s.on_copy_read(copy(1, handed[1].0, handed[1].1));
        assert_eq!(s.poll_transmit(), Some(Transmit::Record(1)));
        assert_eq!(s.poll_transmit(), None);
        s.on_copy_read(copy(1, handed[0].0, handed[0].1));
        let sent: Vec<u64> = std::iter::from_fn(|| match s.poll_transmit() {
            Some(Transmit::Copy(c)) => Some(c.copy_index),
            _ => None,
        })
        .collect();
        assert_eq!(sent, vec![1, 2, 3]);
        assert!(matches!(s.next_copy(&mut bitmaps, true), CopyStep::Read { copy_index: 4, .. }));
    }

    #[test]
    fn the_copy_window_follows_the_links_bandwidth_delay_product() {
        const MIB: u64 = 1 << 20;
        let config = PrimaryConfig { copy_window: 2 * MIB, copy_window_max: 16 * MIB, copy_reads: 64, ..CONFIG };
        let mut s = PrimarySession::new(config, 0, 0);
        let mut bitmaps = vec![DirtyBitmap::new(256 * MIB, 64 << 10)];
        bitmaps[0].set_all();
        // Hands out chunks until the window is full, sends them, and makes
        // them all durable: how many went.
        let mut fill = |s: &mut PrimarySession| {
            let mut n = 0;
            while let CopyStep::Read { copy_index, offset, .. } = s.next_copy(&mut bitmaps, true) {
                s.on_copy_read(copy(0, copy_index, offset));
                assert!(matches!(s.poll_transmit(), Some(Transmit::Copy(_))));
                n += 1;
            }
            let ack = pb::Ack { copy_durable: s.copy_index, ..Default::default() };
            assert_eq!(s.on_ack(&ack).unwrap().copy_bytes, n * MIB);
            n
        };
        let ms = std::time::Duration::from_millis;
        assert_eq!(fill(&mut s), 2, "the configured window to start with");
        // A 100 ms link that took the window in 100 ms: twice its product.
        s.on_copy_interval(ms(100), ms(100));
        assert_eq!(s.copy_windows(), (4 * MIB, 2 * MIB), "hash chunks made nothing durable");
        assert_eq!(fill(&mut s), 4);
        s.on_copy_interval(ms(100), ms(100));
        assert_eq!(fill(&mut s), 8);
        // Never beyond the most configured.
        s.on_copy_interval(ms(100), ms(50));
        assert_eq!(s.copy_windows().0, 16 * MIB);
        // A short round trip against the secondary's sync: the window
        // shrinks by half per interval down to the configured one.
        assert_eq!(fill(&mut s), 16);
        s.on_copy_interval(ms(1), ms(100));
        assert_eq!(s.copy_windows().0, 8 * MIB);
        s.on_copy_interval(ms(1), ms(100));
        s.on_copy_interval(ms(1), ms(100));
        assert_eq!(s.copy_windows().0, 2 * MIB);
        assert_eq!(fill(&mut s), 2);
    }

    #[test]
    fn hash_chunks_made_durable_do_not_open_the_window_of_data_chunks() {
        const MIB: u64 = 1 << 20;
        let config = PrimaryConfig {
            copy_window: 2 * MIB,
            copy_window_max: 64 * MIB,
            copy_reads: 64,
            copy_by_hash: true,
            ..CONFIG
        };
        let mut s = PrimarySession::new(config, 0, 0);
        let mut bitmaps = vec![DirtyBitmap::new(256 * MIB, 64 << 10)];
        bitmaps[0].set_all();
        // Identical sites: every chunk goes as hashes and matches, fast.
        let ms = std::time::Duration::from_millis;
        for _ in 0..5 {
            let mut n = 0;
            while let CopyStep::Read { copy_index, offset, len, hash: true, .. } = s.next_copy(&mut bitmaps, true) {
                let digests = Bytes::from(vec![0u8; crate::record::COPY_HASH_LEN * (len / (64 << 10)) as usize]);
                s.on_copy_read(Record::copy_hash(0, copy_index, 0, offset, len as u32, 64 << 10, 1, digests));
                assert!(matches!(s.poll_transmit(), Some(Transmit::Copy(_))));
                n += len;
            }
            assert!(n > 0);
            s.on_ack(&pb::Ack { copy_durable: s.copy_sent, ..Default::default() }).unwrap();
            s.on_copy_interval(ms(100), ms(100));
        }
        let (data, hashes) = s.copy_windows();
        assert_eq!(hashes, 64 * MIB, "the hashes' window follows what they compared");
        assert_eq!(data, 2 * MIB, "no data crossed the link: its window stays at the floor");
    }

    #[test]
    fn an_ack_of_a_copy_chunk_not_sent_yet_is_refused() {
        let mut s = PrimarySession::new(PrimaryConfig { copy_reads: 2, ..CONFIG }, 0, 0);
        let mut bitmaps = vec![DirtyBitmap::new(4 << 20, 64 << 10)];
        bitmaps[0].set_all();
        let CopyStep::Read { copy_index: first, .. } = s.next_copy(&mut bitmaps, true) else { panic!() };
        let CopyStep::Read { copy_index: second, .. } = s.next_copy(&mut bitmaps, true) else { panic!() };
        s.on_copy_read(copy(0, first, 0));
        assert!(matches!(s.poll_transmit(), Some(Transmit::Copy(_))));
        // The second is still being read: it cannot be durable anywhere.
        let early = pb::Ack { copy_durable: second, ..Default::default() };
        assert!(matches!(s.on_ack(&early), Err(ShipError::AckBeyondSent { field: "copy_durable", .. })));
        s.on_ack(&pb::Ack { copy_durable: first, ..Default::default() }).unwrap();
        s.end(&mut bitmaps);
        assert_eq!(bitmaps[0].dirty_bytes(), 3 << 20, "only the first chunk left the bitmap");
    }

    #[test]
    fn chunks_not_durable_return_to_the_bitmap_when_the_session_ends() {
        let mut s = PrimarySession::new(CONFIG, 0, 0);
        let mut bitmaps = vec![DirtyBitmap::new(4 << 20, 64 << 10)];
        bitmaps[0].set_all();
        let CopyStep::Read { copy_index, .. } = s.next_copy(&mut bitmaps, true) else { panic!() };
        s.on_copy_read(copy(0, copy_index, 0));
        assert!(matches!(s.poll_transmit(), Some(Transmit::Copy(_))));
        let CopyStep::Read { .. } = s.next_copy(&mut bitmaps, true) else { panic!() };
        // The window (2 MiB) is full with two 1 MiB chunks.
        s.on_copy_read(copy(0, 2, 1 << 20));
        assert!(matches!(s.poll_transmit(), Some(Transmit::Copy(_))));
        assert_eq!(s.next_copy(&mut bitmaps, true), CopyStep::WindowFull);
        assert_eq!(bitmaps[0].dirty_bytes(), 2 << 20);
        s.end(&mut bitmaps);
        assert_eq!(bitmaps[0].dirty_bytes(), 4 << 20);
    }

    #[test]
    fn a_flush_goes_out_once_its_records_are_sent() {
        let mut s = PrimarySession::new(CONFIG, 0, 0);
        s.on_journaled(2);
        s.on_flush_wanted(2);
        assert_eq!(s.poll_transmit(), Some(Transmit::Record(1)));
        assert_eq!(s.poll_transmit(), Some(Transmit::Record(2)));
        assert_eq!(s.poll_transmit(), Some(Transmit::Flush(2)));
        assert_eq!(s.poll_transmit(), None);
    }

    /// On a link that never runs out of records to send, a flush request
    /// and COPY_DONE still go out, right after the records they name.
    #[test]
    fn a_flush_and_copy_done_do_not_wait_for_the_records_after_them() {
        let mut s = PrimarySession::new(CONFIG, 0, 0);
        let mut bitmaps = vec![DirtyBitmap::new(4 << 20, 64 << 10)];
        s.on_journaled(2);
        s.on_flush_wanted(2);
        assert_eq!(s.next_copy(&mut bitmaps, true), CopyStep::Finished);
        s.on_journaled(1000);
        let sent: Vec<Transmit> = std::iter::from_fn(|| s.poll_transmit()).take(4).collect();
        assert_eq!(sent, vec![Transmit::CopyDone(0), Transmit::Record(1), Transmit::Record(2), Transmit::Flush(2)]);
        assert_eq!(s.poll_transmit(), Some(Transmit::Record(3)));
    }
}

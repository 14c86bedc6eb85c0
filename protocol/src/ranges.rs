//! An index of in-flight byte ranges per volume, answering "which in-flight
//! entries intersect this range" without scanning every entry.
//!
//! Entries are kept per volume in a map ordered by start offset, together with
//! a multiset of their lengths. An entry can only intersect `[start, end)` if
//! it begins in `[start - max_len, end)`, so a query only visits that window.

use std::collections::{BTreeMap, HashMap};
use std::hash::Hash;

#[derive(Debug, Default, Clone)]
struct VolumeRanges<K> {
    /// (start, insertion id) -> (end, key)
    by_start: BTreeMap<(u64, u64), (u64, K)>,
    /// length -> number of entries with that length
    lens: BTreeMap<u64, usize>,
}

#[derive(Debug, Clone)]
pub(crate) struct RangeIndex<K> {
    volumes: HashMap<u32, VolumeRanges<K>>,
    /// key -> (volume, start, insertion id, end)
    by_key: HashMap<K, (u32, u64, u64, u64)>,
    next_id: u64,
}

impl<K> Default for RangeIndex<K> {
    fn default() -> Self {
        RangeIndex { volumes: HashMap::new(), by_key: HashMap::new(), next_id: 0 }
    }
}

impl<K: Copy + Eq + Hash + Ord> RangeIndex<K> {
    /// Adds `key` covering `[start, end)` of `volume` (empty ranges are kept
    /// but intersect nothing). Replaces an existing entry with the same key.
    pub(crate) fn insert(&mut self, key: K, volume: u32, start: u64, end: u64) {
        self.remove(key);
        let end = end.max(start);
        let id = self.next_id;
        self.next_id += 1;
        self.by_key.insert(key, (volume, start, id, end));
        if end > start {
            let v = self
                .volumes
                .entry(volume)
                .or_insert_with(|| VolumeRanges { by_start: BTreeMap::new(), lens: BTreeMap::new() });
            v.by_start.insert((start, id), (end, key));
            *v.lens.entry(end - start).or_insert(0) += 1;
        }
    }

    /// Removes `key`; returns whether it was present.
    pub(crate) fn remove(&mut self, key: K) -> bool {
        let Some((volume, start, id, end)) = self.by_key.remove(&key) else {
            return false;
        };
        if end > start {
            if let Some(v) = self.volumes.get_mut(&volume) {
                v.by_start.remove(&(start, id));
                let len = end - start;
                if let Some(n) = v.lens.get_mut(&len) {
                    *n -= 1;
                    if *n == 0 {
                        v.lens.remove(&len);
                    }
                }
                if v.by_start.is_empty() {
                    self.volumes.remove(&volume);
                }
            }
        }
        true
    }

    /// Removes those of `keys` whose range lies within `[start, end)` of
    /// `volume`.
    pub(crate) fn remove_within(&mut self, keys: &[K], volume: u32, start: u64, end: u64) {
        for &key in keys {
            if self.by_key.get(&key).is_some_and(|&(v, s, _, e)| v == volume && start <= s && e <= end) {
                self.remove(key);
            }
        }
    }

    pub(crate) fn contains(&self, key: K) -> bool {
        self.by_key.contains_key(&key)
    }

    pub(crate) fn len(&self) -> usize {
        self.by_key.len()
    }

    /// Keys of the entries intersecting `[start, end)` on `volume`, sorted.
    pub(crate) fn overlapping(&self, volume: u32, start: u64, end: u64) -> Vec<K> {
        let mut out = Vec::new();
        if end <= start {
            return out;
        }
        let Some(v) = self.volumes.get(&volume) else {
            return out;
        };
        let max_len = v.lens.last_key_value().map_or(0, |(l, _)| *l);
        let lo = start.saturating_sub(max_len);
        for (_, &(e_end, key)) in v.by_start.range((lo, 0)..(end, 0)) {
            if e_end > start {
                out.push(key);
            }
        }
        out.sort_unstable();
        out
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]
        #[test]
        fn matches_brute_force(ops in proptest::collection::vec(
            (any::<bool>(), 0u32..3, 0u64..200, 0u64..60, 0u16..40), 1..150)) {
            let mut idx: RangeIndex<u16> = RangeIndex::default();
            let mut model: HashMap<u16, (u32, u64, u64)> = HashMap::new();
            for (ins, vol, start, len, key) in ops {
                if ins {
                    idx.insert(key, vol, start, start + len);
                    model.insert(key, (vol, start, start + len));
                } else {
                    prop_assert_eq!(idx.remove(key), model.remove(&key).is_some());
                }
                prop_assert_eq!(idx.len(), model.len());
                let qe = start + len;
                let mut want: Vec<u16> = model.iter()
                    .filter(|(_, &(v, s, e))| v == vol && s < qe && start < e && s < e && start < qe)
                    .map(|(k, _)| *k).collect();
                want.sort_unstable();
                prop_assert_eq!(idx.overlapping(vol, start, qe), want);
            }
        }
    }
}

//! The volatile write cache of `powercut-fs` (the FUSE file system the
//! power-loss tests put each site's files on), without FUSE, so that its
//! logic is unit-tested on its own.
//!
//! A [`FileCache`] holds the dirty 4 KiB pages of one file, layered over the
//! file's backing store (a [`Backing`]: the real file in the backing
//! directory). Writes land in the cache; reads merge the cache over the
//! backing bytes; `fsync`/`fdatasync` ([`FileCache::flush`]) writes the dirty
//! pages to the backing file and syncs it; a power cut ([`FileCache::cut`])
//! drops the dirty pages, or keeps any subset of them, as a disk with a
//! volatile write cache may.
//!
//! Simplification (as LazyFS by default): only file *data* is volatile. The
//! file size is metadata and is durable at once — a write past the end of the
//! file extends the backing file (with zeroes) at once, a truncate shrinks it
//! at once — so the backing file's size is always the file's size, and after
//! a cut the bytes a lost write would have put past the old end read as
//! zeroes.

use std::collections::BTreeMap;
use std::io;
use std::os::unix::fs::FileExt;

/// Cache page size.
pub const PAGE: u64 = 4096;
const PAGE_USIZE: usize = PAGE as usize;

/// The durable store under a cache: the backing file.
pub trait Backing {
    /// Reads at `off` into `buf`; returns the bytes read (short at the end of
    /// the file).
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<usize>;
    /// Writes all of `buf` at `off`.
    fn write_all_at(&self, buf: &[u8], off: u64) -> io::Result<()>;
    /// Current size in bytes.
    fn size(&self) -> io::Result<u64>;
    /// Sets the size (truncates or extends with zeroes).
    fn set_size(&self, size: u64) -> io::Result<()>;
    /// Makes everything written durable (fdatasync).
    fn sync_data(&self) -> io::Result<()>;
}

impl Backing for std::fs::File {
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<usize> {
        FileExt::read_at(self, buf, off)
    }

    fn write_all_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        FileExt::write_all_at(self, buf, off)
    }

    fn size(&self) -> io::Result<u64> {
        Ok(self.metadata()?.len())
    }

    fn set_size(&self, size: u64) -> io::Result<()> {
        self.set_len(size)
    }

    fn sync_data(&self) -> io::Result<()> {
        std::fs::File::sync_data(self)
    }
}

/// One dirty page.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Page {
    /// All zeroes (a punched hole or zeroed range), without storing them.
    Zero,
    /// Bytes.
    Data(Box<[u8]>),
}

impl Page {
    fn bytes(&self) -> Box<[u8]> {
        match self {
            Page::Zero => vec![0u8; PAGE_USIZE].into_boxed_slice(),
            Page::Data(b) => b.clone(),
        }
    }
}

/// What a cut did to one file.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CutResult {
    /// Dirty pages lost.
    pub dropped: u64,
    /// Dirty pages written to the backing file first (kept by the "disk").
    pub kept: u64,
}

/// The dirty pages of one file. See the module documentation.
#[derive(Debug, Default)]
pub struct FileCache {
    pages: BTreeMap<u64, Page>,
}

/// Reads `buf.len()` bytes at `off` from `b`, zero-filling past its end.
fn read_full(b: &dyn Backing, buf: &mut [u8], off: u64) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match b.read_at(&mut buf[done..], off + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    buf[done..].fill(0);
    Ok(())
}

fn end_of(off: u64, len: u64) -> io::Result<u64> {
    off.checked_add(len).ok_or_else(|| io::Error::from_raw_os_error(libc::EFBIG))
}

impl FileCache {
    /// An empty cache (nothing dirty).
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of dirty pages.
    pub fn dirty_pages(&self) -> u64 {
        self.pages.len() as u64
    }

    /// The page `idx` as it currently reads (cached, or from the backing
    /// file), for a partial update.
    fn page_for_update(&mut self, b: &dyn Backing, idx: u64) -> io::Result<&mut Box<[u8]>> {
        let page = match self.pages.remove(&idx) {
            Some(p) => p.bytes(),
            None => {
                let mut buf = vec![0u8; PAGE_USIZE].into_boxed_slice();
                read_full(b, &mut buf, idx * PAGE)?;
                buf
            }
        };
        let slot = self.pages.entry(idx).or_insert(Page::Data(page));
        match slot {
            Page::Data(bytes) => Ok(bytes),
            // Just inserted as Data; unreachable in practice, but answer
            // with an error rather than panic.
            Page::Zero => Err(io::Error::other("cache page changed kind during an update")),
        }
    }

    /// Applies `data` at `off` to the cached pages (no size change).
    fn put(&mut self, b: &dyn Backing, off: u64, data: &[u8]) -> io::Result<()> {
        let mut pos = 0usize;
        while pos < data.len() {
            let at = off + pos as u64;
            let idx = at / PAGE;
            let in_page = (at % PAGE) as usize;
            let n = (PAGE_USIZE - in_page).min(data.len() - pos);
            if n == PAGE_USIZE {
                self.pages.insert(idx, Page::Data(data[pos..pos + n].to_vec().into_boxed_slice()));
            } else {
                let page = self.page_for_update(b, idx)?;
                page[in_page..in_page + n].copy_from_slice(&data[pos..pos + n]);
            }
            pos += n;
        }
        Ok(())
    }

    /// Extends the backing file to `end` if it is shorter (size is durable
    /// at once).
    fn extend_to(b: &dyn Backing, end: u64) -> io::Result<()> {
        if b.size()? < end {
            b.set_size(end)?;
        }
        Ok(())
    }

    /// A volatile write: the data is in the cache (and reads see it) until a
    /// flush makes it durable or a cut drops it.
    pub fn write(&mut self, b: &dyn Backing, off: u64, data: &[u8]) -> io::Result<()> {
        let end = end_of(off, data.len() as u64)?;
        Self::extend_to(b, end)?;
        self.put(b, off, data)
    }

    /// A durable write (O_DSYNC, RWF_DSYNC, FUA): `data` goes to the backing
    /// file, which is synced, before this returns. Pages it covers entirely
    /// are no longer dirty; a partly covered dirty page stays dirty for its
    /// other bytes (a cut then leaves the new bytes with the old rest).
    pub fn write_durable(&mut self, b: &dyn Backing, off: u64, data: &[u8]) -> io::Result<()> {
        let end = end_of(off, data.len() as u64)?;
        Self::extend_to(b, end)?;
        b.write_all_at(data, off)?;
        b.sync_data()?;
        let mut pos = 0usize;
        while pos < data.len() {
            let at = off + pos as u64;
            let idx = at / PAGE;
            let in_page = (at % PAGE) as usize;
            let n = (PAGE_USIZE - in_page).min(data.len() - pos);
            if n == PAGE_USIZE {
                self.pages.remove(&idx);
            } else if self.pages.contains_key(&idx) {
                let page = self.page_for_update(b, idx)?;
                page[in_page..in_page + n].copy_from_slice(&data[pos..pos + n]);
            }
            pos += n;
        }
        Ok(())
    }

    /// Zeroes `len` bytes at `off` in the cache (fallocate PUNCH_HOLE or
    /// ZERO_RANGE: volatile like a write). Without `keep_size` the file is
    /// first extended to cover the range.
    pub fn zero_range(&mut self, b: &dyn Backing, off: u64, len: u64, keep_size: bool) -> io::Result<()> {
        let end = end_of(off, len)?;
        let size = b.size()?;
        if !keep_size && size < end {
            b.set_size(end)?;
        }
        // Past the old end the backing file reads as zeroes already.
        let end = end.min(size);
        let mut at = off;
        while at < end {
            let idx = at / PAGE;
            let in_page = (at % PAGE) as usize;
            let n = (PAGE - at % PAGE).min(end - at);
            if n == PAGE {
                self.pages.insert(idx, Page::Zero);
            } else {
                let page = self.page_for_update(b, idx)?;
                page[in_page..in_page + n as usize].fill(0);
            }
            at += n;
        }
        Ok(())
    }

    /// Reads up to `len` bytes at `off`: the backing bytes with the cached
    /// pages over them, ending at the end of the file.
    pub fn read(&self, b: &dyn Backing, off: u64, len: u64) -> io::Result<Vec<u8>> {
        let size = b.size()?;
        if off >= size {
            return Ok(Vec::new());
        }
        let end = end_of(off, len)?.min(size);
        let mut buf = vec![0u8; (end - off) as usize];
        read_full(b, &mut buf, off)?;
        let (first, last) = (off / PAGE, (end - 1) / PAGE);
        for (&idx, page) in self.pages.range(first..=last) {
            let page_start = idx * PAGE;
            let from = page_start.max(off);
            let to = (page_start + PAGE).min(end);
            let dst = &mut buf[(from - off) as usize..(to - off) as usize];
            let src_range = (from - page_start) as usize..(to - page_start) as usize;
            match page {
                Page::Zero => dst.fill(0),
                Page::Data(bytes) => dst.copy_from_slice(&bytes[src_range]),
            }
        }
        Ok(buf)
    }

    /// Truncates (or extends) the file to `size`, durably at once, dropping
    /// cached bytes past it.
    pub fn set_size(&mut self, b: &dyn Backing, size: u64) -> io::Result<()> {
        b.set_size(size)?;
        let first_gone = size.div_ceil(PAGE);
        let _ = self.pages.split_off(&first_gone);
        if size % PAGE != 0 {
            if let Some(Page::Data(bytes)) = self.pages.get_mut(&(size / PAGE)) {
                bytes[(size % PAGE) as usize..].fill(0);
            }
        }
        Ok(())
    }

    /// Writes the pages `keep` selects to the backing file (each clipped to
    /// the file's size, so a flush never extends the file) and drops every
    /// page. The caller syncs.
    fn write_back(&mut self, b: &dyn Backing, mut keep: impl FnMut(u64) -> bool) -> io::Result<CutResult> {
        let size = b.size()?;
        let pages = std::mem::take(&mut self.pages);
        let mut result = CutResult::default();
        // Runs of consecutive kept pages, written with one call each.
        let mut run: Vec<u8> = Vec::new();
        let mut run_start = 0u64;
        let flush_run = |run: &mut Vec<u8>, start: u64| -> io::Result<()> {
            if !run.is_empty() && start < size {
                let n = (run.len() as u64).min(size - start) as usize;
                b.write_all_at(&run[..n], start)?;
            }
            run.clear();
            Ok(())
        };
        for (idx, page) in pages {
            if !keep(idx) {
                result.dropped += 1;
                continue;
            }
            result.kept += 1;
            let start = idx * PAGE;
            if run.is_empty() || run_start + run.len() as u64 != start || run.len() >= (8 << 20) {
                flush_run(&mut run, run_start)?;
                run_start = start;
            }
            match page {
                Page::Zero => run.resize(run.len() + PAGE_USIZE, 0),
                Page::Data(bytes) => run.extend_from_slice(&bytes),
            }
        }
        flush_run(&mut run, run_start)?;
        Ok(result)
    }

    /// fsync/fdatasync: every dirty page is written to the backing file,
    /// which is then synced; nothing is dirty afterwards. Returns the pages
    /// written.
    pub fn flush(&mut self, b: &dyn Backing) -> io::Result<u64> {
        let r = self.write_back(b, |_| true)?;
        b.sync_data()?;
        Ok(r.kept)
    }

    /// A power cut: every dirty page is lost, except those `keep` selects
    /// (given the page index), which the "disk" had written after all.
    pub fn cut(&mut self, b: &dyn Backing, keep: impl FnMut(u64) -> bool) -> io::Result<CutResult> {
        let r = self.write_back(b, keep)?;
        if r.kept > 0 {
            b.sync_data()?;
        }
        Ok(r)
    }

    /// Drops every dirty page without writing anything (the file is gone).
    pub fn discard(&mut self) -> u64 {
        let n = self.pages.len() as u64;
        self.pages.clear();
        n
    }
}

/// A deterministic choice of pages for `cut keep SEED FRACTION`: page
/// `(file, idx)` is kept when a hash of (seed, file, idx) falls below
/// `fraction`. Independent of iteration order.
pub fn keep_page(seed: u64, fraction: f64, file: u64, idx: u64) -> bool {
    if fraction <= 0.0 {
        return false;
    }
    if fraction >= 1.0 {
        return true;
    }
    // splitmix64 over the three inputs.
    let mut z = seed ^ file.rotate_left(21) ^ idx.rotate_left(42) ^ 0x9E37_79B9_7F4A_7C15;
    for _ in 0..2 {
        z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
    }
    ((z >> 11) as f64 / (1u64 << 53) as f64) < fraction
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::{Cell, RefCell};

    /// An in-memory backing file that counts syncs and remembers what was
    /// synced (the "durable" image).
    #[derive(Default)]
    struct Mem {
        data: RefCell<Vec<u8>>,
        durable: RefCell<Vec<u8>>,
        syncs: Cell<u32>,
    }

    impl Backing for Mem {
        fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<usize> {
            let d = self.data.borrow();
            if off as usize >= d.len() {
                return Ok(0);
            }
            let n = buf.len().min(d.len() - off as usize);
            buf[..n].copy_from_slice(&d[off as usize..off as usize + n]);
            Ok(n)
        }
        fn write_all_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
            let mut d = self.data.borrow_mut();
            let end = off as usize + buf.len();
            if d.len() < end {
                d.resize(end, 0);
            }
            d[off as usize..end].copy_from_slice(buf);
            Ok(())
        }
        fn size(&self) -> io::Result<u64> {
            Ok(self.data.borrow().len() as u64)
        }
        fn set_size(&self, size: u64) -> io::Result<()> {
            self.data.borrow_mut().resize(size as usize, 0);
            Ok(())
        }
        fn sync_data(&self) -> io::Result<()> {
            self.syncs.set(self.syncs.get() + 1);
            *self.durable.borrow_mut() = self.data.borrow().clone();
            Ok(())
        }
    }

    fn filled(len: usize, v: u8) -> Vec<u8> {
        vec![v; len]
    }

    #[test]
    fn reads_merge_cached_pages_over_the_backing_file() {
        let b = Mem::default();
        b.write_all_at(&filled(5 * PAGE_USIZE, 1), 0).expect("seed");
        let mut c = FileCache::new();
        // A partial page, a page-crossing range, a full page.
        c.write(&b, 100, &filled(10, 2)).expect("write");
        c.write(&b, PAGE * 2 - 5, &filled(10, 3)).expect("write");
        c.write(&b, PAGE * 3, &filled(PAGE_USIZE, 4)).expect("write");
        assert_eq!(c.dirty_pages(), 4);
        // The backing file is untouched.
        assert!(b.data.borrow().iter().all(|&x| x == 1));
        let r = c.read(&b, 0, 5 * PAGE).expect("read");
        let mut want = filled(5 * PAGE_USIZE, 1);
        want[100..110].fill(2);
        want[2 * PAGE_USIZE - 5..2 * PAGE_USIZE + 5].fill(3);
        want[3 * PAGE_USIZE..4 * PAGE_USIZE].fill(4);
        assert_eq!(r, want);
        // An unaligned read window.
        assert_eq!(c.read(&b, 95, 20).expect("read"), want[95..115]);
        // Reads stop at the end of the file.
        assert_eq!(c.read(&b, 5 * PAGE - 3, 100).expect("read").len(), 3);
        assert!(c.read(&b, 6 * PAGE, 100).expect("read").is_empty());
    }

    #[test]
    fn a_write_past_the_end_extends_the_file_at_once_and_a_cut_leaves_zeroes() {
        let b = Mem::default();
        b.write_all_at(b"hello", 0).expect("seed");
        let mut c = FileCache::new();
        c.write(&b, 10, b"world").expect("write");
        assert_eq!(b.size().expect("size"), 15, "size is durable at once");
        assert_eq!(c.read(&b, 0, 100).expect("read"), b"hello\0\0\0\0\0world");
        let r = c.cut(&b, |_| false).expect("cut");
        assert_eq!(r, CutResult { dropped: 1, kept: 0 });
        assert_eq!(c.read(&b, 0, 100).expect("read"), b"hello\0\0\0\0\0\0\0\0\0\0");
    }

    #[test]
    fn flush_makes_pages_durable_and_never_extends_the_file() {
        let b = Mem::default();
        let mut c = FileCache::new();
        c.write(&b, 0, &filled(PAGE_USIZE + 10, 7)).expect("write");
        assert_eq!(b.size().expect("size"), PAGE + 10);
        assert_eq!(c.flush(&b).expect("flush"), 2);
        assert_eq!(c.dirty_pages(), 0);
        assert_eq!(*b.durable.borrow(), filled(PAGE_USIZE + 10, 7), "the partial last page is written up to EOF");
        // A flush with nothing dirty still syncs (fsync must not fail).
        let before = b.syncs.get();
        assert_eq!(c.flush(&b).expect("flush"), 0);
        assert_eq!(b.syncs.get(), before + 1);
    }

    #[test]
    fn truncate_drops_pages_past_the_end_and_zeroes_the_tail_of_the_last() {
        let b = Mem::default();
        let mut c = FileCache::new();
        c.write(&b, 0, &filled(3 * PAGE_USIZE, 9)).expect("write");
        c.set_size(&b, PAGE + 100).expect("truncate");
        assert_eq!(c.dirty_pages(), 2);
        assert_eq!(c.read(&b, 0, 10 * PAGE).expect("read"), filled(PAGE_USIZE + 100, 9));
        // Extending again shows zeroes, not the old cached bytes.
        c.set_size(&b, 3 * PAGE).expect("extend");
        let r = c.read(&b, 0, 10 * PAGE).expect("read");
        assert_eq!(r.len(), 3 * PAGE_USIZE);
        assert!(r[..PAGE_USIZE + 100].iter().all(|&x| x == 9));
        assert!(r[PAGE_USIZE + 100..].iter().all(|&x| x == 0));
        c.flush(&b).expect("flush");
        assert_eq!(*b.durable.borrow(), r);
    }

    #[test]
    fn durable_writes_survive_a_cut_and_leave_other_dirty_bytes_volatile() {
        let b = Mem::default();
        b.write_all_at(&filled(2 * PAGE_USIZE, 1), 0).expect("seed");
        let mut c = FileCache::new();
        c.write(&b, 0, &filled(2 * PAGE_USIZE, 2)).expect("write");
        // A durable write covering page 1 whole and 10 bytes of page 0.
        c.write_durable(&b, PAGE - 10, &filled(PAGE_USIZE + 10, 3)).expect("dsync write");
        assert_eq!(c.dirty_pages(), 1, "page 1 is clean, page 0 still dirty");
        let mut want = filled(2 * PAGE_USIZE, 2);
        want[PAGE_USIZE - 10..].fill(3);
        assert_eq!(c.read(&b, 0, 2 * PAGE).expect("read"), want);
        c.cut(&b, |_| false).expect("cut");
        let mut want = filled(2 * PAGE_USIZE, 1);
        want[PAGE_USIZE - 10..].fill(3);
        assert_eq!(c.read(&b, 0, 2 * PAGE).expect("read"), want);
    }

    #[test]
    fn zero_range_is_volatile_and_respects_keep_size() {
        let b = Mem::default();
        b.write_all_at(&filled(3 * PAGE_USIZE, 5), 0).expect("seed");
        let mut c = FileCache::new();
        c.zero_range(&b, 100, 2 * PAGE, true).expect("punch");
        let r = c.read(&b, 0, 3 * PAGE).expect("read");
        assert!(r[..100].iter().all(|&x| x == 5));
        assert!(r[100..2 * PAGE_USIZE + 100].iter().all(|&x| x == 0));
        assert!(r[2 * PAGE_USIZE + 100..].iter().all(|&x| x == 5));
        // KEEP_SIZE past the end: no growth.
        c.zero_range(&b, 3 * PAGE - 10, 100, true).expect("punch past EOF");
        assert_eq!(b.size().expect("size"), 3 * PAGE);
        // Without KEEP_SIZE the file grows.
        c.zero_range(&b, 3 * PAGE, PAGE, false).expect("zero range");
        assert_eq!(b.size().expect("size"), 4 * PAGE);
        c.cut(&b, |_| false).expect("cut");
        assert!(c.read(&b, 0, 3 * PAGE).expect("read").iter().all(|&x| x == 5), "the punch was lost");
    }

    #[test]
    fn a_cut_may_keep_any_subset_of_pages() {
        let b = Mem::default();
        b.set_size(8 * PAGE).expect("size");
        let mut c = FileCache::new();
        for i in 0..8u64 {
            c.write(&b, i * PAGE, &filled(PAGE_USIZE, i as u8 + 1)).expect("write");
        }
        let r = c.cut(&b, |idx| idx % 3 == 0).expect("cut");
        assert_eq!(r, CutResult { dropped: 5, kept: 3 });
        assert_eq!(c.dirty_pages(), 0);
        let data = c.read(&b, 0, 8 * PAGE).expect("read");
        for i in 0..8usize {
            let want = if i % 3 == 0 { i as u8 + 1 } else { 0 };
            assert!(data[i * PAGE_USIZE..(i + 1) * PAGE_USIZE].iter().all(|&x| x == want), "page {i}");
        }
        assert_eq!(*b.durable.borrow(), data, "kept pages were synced");
    }

    #[test]
    fn keep_page_is_deterministic_and_roughly_the_fraction() {
        let kept = (0..10_000u64).filter(|&i| keep_page(7, 0.3, 1, i)).count();
        assert!((2_500..3_500).contains(&kept), "{kept}");
        assert_eq!(keep_page(7, 0.3, 1, 42), keep_page(7, 0.3, 1, 42));
        assert!(!keep_page(7, 0.0, 1, 42));
        assert!(keep_page(7, 1.0, 1, 42));
    }
}

//! A metadata file saved in place: the activity log and the dirty bitmaps.
//!
//! A write to a region new to the activity log waits for a save of the log
//! before it reaches the volume, so a save is on the write path. A save by
//! temporary file and rename costs an fsync of a new file, a rename and an
//! fsync of the directory: two file-system journal commits, which on a busy
//! disk wait behind everything else the file system has to commit (10 ms
//! each, now and then hundreds, measured under a 1 MiB sequential load). A
//! [`SlottedFile`] is written in place instead, as DRBD writes its activity
//! log: one write into blocks already allocated and one `fdatasync`, which
//! needs no journal commit.
//!
//! Layout: two slots of equal size (a multiple of 4 KiB), the file being
//! exactly the two. Each slot is a header, then the payload:
//! magic `RPLSLOT1`, save counter (u64), payload length (u64), CRC32 of the
//! header's first 24 bytes followed by the payload (u32), 4 zero bytes
//! (little-endian). A save writes the slot that does not hold the newest
//! save, with the next counter, and syncs it; a read takes the valid slot
//! with the highest counter. A power cut during a save leaves that slot
//! torn (the disk may keep any subset of its pages), and the other slot
//! still holds the previous save: what was on disk before the save began,
//! which is all a save's waiters may rely on. A save that fails is retried
//! into the same slot, and opening the file makes its newest save durable
//! (a process killed between a save's write and its sync left it in the
//! page cache), so the previous save is never overwritten before a newer
//! one is durable.
//!
//! A payload too large for the slots (a log grown past its budget, a first
//! save) lays the file out anew, twice as large as needed, through
//! [`write_atomically`]. A file in the plain format of older releases (the
//! payload alone) is read as it is and replaced by a slotted one at its
//! first save.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::state::write_atomically;

const MAGIC: &[u8; 8] = b"RPLSLOT1";
const HEADER_LEN: usize = 32;
const BLOCK: usize = 4096;

/// A metadata file open for saves (see the module documentation).
#[derive(Debug)]
pub struct SlottedFile {
    path: PathBuf,
    /// The file in the slotted layout, `None` until the first save lays it
    /// out (absent, or in the older plain format).
    file: Option<File>,
    slot_len: usize,
    /// Counter and slot of the newest save on disk.
    counter: u64,
    newest_slot: usize,
}

impl SlottedFile {
    /// Opens `path` for saves, whatever it holds now: a slotted file,
    /// a file in the older plain format, or nothing.
    pub fn open(path: &Path) -> io::Result<Self> {
        let mut me = Self { path: path.to_path_buf(), file: None, slot_len: 0, counter: 0, newest_slot: 1 };
        let mut file = match open_rw(path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(me),
            Err(e) => return Err(e),
        };
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        if let Some(slots) = Slots::parse(&bytes) {
            me.slot_len = slots.slot_len;
            if let Some((slot, counter, payload)) = slots.newest() {
                (me.newest_slot, me.counter) = (slot, counter);
                // The newest save may be in the page cache alone (a daemon
                // killed between its write and its sync, or a sync that
                // failed): durable before any save here writes the other
                // slot, which may hold the only durable copy. Written again,
                // not only synced: pages whose writeback failed are clean
                // in the cache, and a sync would not write them.
                let at = slot * slots.slot_len;
                file.write_all_at(&bytes[at..at + HEADER_LEN + payload.len()], at as u64)?;
                file.sync_data()?;
            }
            me.file = Some(file);
        }
        Ok(me)
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Makes `payload` the file's content, durably, before returning.
    pub fn save(&mut self, payload: &[u8]) -> io::Result<()> {
        let counter = self.counter + 1;
        let image = slot_image(counter, payload);
        match &self.file {
            Some(file) if image.len() <= self.slot_len => {
                let slot = 1 - self.newest_slot;
                file.write_all_at(&image, (slot * self.slot_len) as u64)?;
                file.sync_data()?;
                self.newest_slot = slot;
            }
            _ => {
                // Slot 0 holds the save, slot 1 zeroes (written, so that
                // later saves into it allocate nothing). Until the new file
                // is open, no handle to the old one is kept: a failure
                // after the rename must not leave saves going to it.
                self.file = None;
                let slot_len = (2 * image.len()).div_ceil(BLOCK) * BLOCK;
                let mut whole = image;
                whole.resize(2 * slot_len, 0);
                write_atomically(&self.path, &whole)?;
                self.file = Some(open_rw(&self.path)?);
                self.slot_len = slot_len;
                self.newest_slot = 0;
            }
        }
        self.counter = counter;
        Ok(())
    }
}

fn open_rw(path: &Path) -> io::Result<File> {
    OpenOptions::new().read(true).write(true).custom_flags(libc::O_NOFOLLOW).open(path)
}

/// The payload of the newest save in `path`, `None` if the file is absent.
/// A file in the older plain format is returned whole (its own format has
/// its own checksum). A slotted file with no valid slot is an error.
pub fn read(path: &Path) -> io::Result<Option<Vec<u8>>> {
    let bytes = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    if !bytes.starts_with(MAGIC) {
        return Ok(Some(bytes));
    }
    let newest = Slots::parse(&bytes).and_then(|s| s.newest().map(|(_, _, payload)| payload.to_vec()));
    newest.map(Some).ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no intact copy in either slot"))
}

/// One slot's bytes: header and payload.
fn slot_image(counter: u64, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&counter.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    let mut crc = crc32fast::Hasher::new();
    crc.update(&out);
    crc.update(payload);
    out.extend_from_slice(&crc.finalize().to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(payload);
    out
}

/// A file's bytes split into its two slots.
struct Slots<'a> {
    bytes: &'a [u8],
    slot_len: usize,
}

impl<'a> Slots<'a> {
    /// `None` unless the file is in the slotted layout (slot 0 always
    /// starts with the magic: every save into it writes its first block).
    fn parse(bytes: &'a [u8]) -> Option<Self> {
        let slot_len = bytes.len() / 2;
        (bytes.starts_with(MAGIC) && slot_len >= BLOCK && slot_len % BLOCK == 0 && bytes.len() == 2 * slot_len)
            .then_some(Self { bytes, slot_len })
    }

    /// The intact slot with the highest counter: (slot, counter, payload).
    fn newest(&self) -> Option<(usize, u64, &'a [u8])> {
        (0..2).filter_map(|i| self.intact(i).map(|(c, p)| (i, c, p))).max_by_key(|&(_, c, _)| c)
    }

    fn intact(&self, slot: usize) -> Option<(u64, &'a [u8])> {
        let s = &self.bytes[slot * self.slot_len..(slot + 1) * self.slot_len];
        let word = |at: usize| u64::from_le_bytes(s[at..at + 8].try_into().unwrap_or_default());
        let len = usize::try_from(word(16)).ok().filter(|&l| l <= self.slot_len - HEADER_LEN)?;
        let payload = &s[HEADER_LEN..HEADER_LEN + len];
        let mut crc = crc32fast::Hasher::new();
        crc.update(&s[..24]);
        crc.update(payload);
        let stored = u32::from_le_bytes(s[24..28].try_into().unwrap_or_default());
        (s.starts_with(MAGIC) && crc.finalize() == stored).then_some((word(8), payload))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn saves_alternate_slots_in_place_and_a_read_takes_the_newest() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("activity-log");
        let mut f = SlottedFile::open(&path).unwrap();
        assert_eq!(read(&path).unwrap(), None);
        f.save(b"one").unwrap();
        let inode = fs::metadata(&path).unwrap();
        assert_eq!(inode.len(), 2 * BLOCK as u64);
        for text in ["two", "three", "four"] {
            f.save(text.as_bytes()).unwrap();
            assert_eq!(read(&path).unwrap().unwrap(), text.as_bytes());
        }
        // Written in place: the same inode, no temporary file left.
        use std::os::unix::fs::MetadataExt;
        assert_eq!(fs::metadata(&path).unwrap().ino(), inode.ino());
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);

        // A reopened file continues from the newest save.
        let mut again = SlottedFile::open(&path).unwrap();
        again.save(b"five").unwrap();
        assert_eq!(read(&path).unwrap().unwrap(), b"five");
        assert_eq!(fs::metadata(&path).unwrap().ino(), inode.ino());
    }

    #[test]
    fn a_torn_save_leaves_the_previous_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bitmap-vol");
        let mut f = SlottedFile::open(&path).unwrap();
        f.save(&[1; 5000]).unwrap();
        f.save(&[2; 5000]).unwrap();
        // The next save goes to slot 0; a power cut keeps only its second
        // block: slot 0 is torn, slot 1 still holds the save of 2s.
        let slot_len = fs::metadata(&path).unwrap().len() as usize / 2;
        let next = slot_image(3, &[3; 5000]);
        let raw = OpenOptions::new().write(true).open(&path).unwrap();
        raw.write_all_at(&next[BLOCK..], BLOCK as u64).unwrap();
        assert!(read(&path).unwrap().unwrap() == vec![2; 5000], "expected the save of 2s");
        // Only the header block kept: torn as well.
        raw.write_all_at(&next[..BLOCK], 0).unwrap();
        raw.write_all_at(&slot_image(1, &[1; 5000])[BLOCK..], BLOCK as u64).unwrap();
        assert!(read(&path).unwrap().unwrap() == vec![2; 5000], "expected the save of 2s");
        // The writer reopened after the cut saves over the torn slot.
        let mut again = SlottedFile::open(&path).unwrap();
        again.save(&[4; 5000]).unwrap();
        assert!(read(&path).unwrap().unwrap() == vec![4; 5000], "expected the save of 4s");
        assert_eq!(fs::metadata(&path).unwrap().len() as usize, 2 * slot_len);
        // Both slots damaged: an error, not a guess.
        raw.write_all_at(&[0xff; 4], 24).unwrap();
        raw.write_all_at(&[0xff; 4], slot_len as u64 + 24).unwrap();
        let e = read(&path).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
    }

    #[test]
    fn a_payload_larger_than_the_slots_lays_the_file_out_anew() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("activity-log");
        let mut f = SlottedFile::open(&path).unwrap();
        f.save(&[7; 100]).unwrap();
        f.save(&[8; 3 * BLOCK]).unwrap();
        assert!(read(&path).unwrap().unwrap() == vec![8; 3 * BLOCK], "expected the save of 8s");
        let len = fs::metadata(&path).unwrap().len() as usize;
        assert!(len >= 4 * (3 * BLOCK + HEADER_LEN) && len % (2 * BLOCK) == 0, "{len}");
        f.save(&[9; 10]).unwrap();
        assert!(read(&path).unwrap().unwrap() == vec![9; 10], "expected the save of 9s");
    }

    #[test]
    fn a_file_in_the_older_plain_format_is_read_whole_and_replaced_at_the_first_save() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("activity-log");
        fs::write(&path, b"RPLACTL1 older format").unwrap();
        assert_eq!(read(&path).unwrap().unwrap(), b"RPLACTL1 older format");
        let mut f = SlottedFile::open(&path).unwrap();
        f.save(b"new").unwrap();
        assert_eq!(read(&path).unwrap().unwrap(), b"new");
        f.save(b"newer").unwrap();
        assert_eq!(read(&path).unwrap().unwrap(), b"newer");
    }
}

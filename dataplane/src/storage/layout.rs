//! The on-disk layout: where every structure lives, and the superblock that records it.
//! Pure arithmetic and encoding, no I/O; `docs/on-disk-format.md` describes the same thing
//! for people.
//!
//! ```text
//! [superblock page][pad to 1 MiB][shard 0 region][shard 1 region]...
//! shard region: [anchor A|B][copyset pages A|B x max_copysets][chunk metadata pages A|B]
//!               [page bitmaps A|B, per slot][WAL ring][chunk slots]
//! ```

use crate::storage::StorageError;

/// "CHUNKSRV" read as a little-endian u64.
pub const SUPERBLOCK_MAGIC: u64 = u64::from_le_bytes(*b"CHUNKSRV");
/// The version this build writes and the only one it reads.
pub const FORMAT_VERSION: u32 = 1;
/// Where the shard regions start: the superblock page, padded so regions are well aligned.
pub const SHARD_AREA_OFFSET: u64 = 1 << 20;
/// Size of one chunk metadata entry on disk.
pub const META_ENTRY_LEN: usize = 64;
/// Header of every checksummed page (magic, crc, generation, page number, kind).
pub const PAGE_HEADER_LEN: usize = 32;
/// How many copysets one shard can hold (one metadata page pair each).
pub const DEFAULT_MAX_COPYSETS: u32 = 256;

/// What a layout is computed from; all of it is recorded in the superblock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// The device's block size: the unit of I/O.
    pub block_size: u32,
    /// The page: unit of chunk I/O alignment and of copy-on-write.
    pub page_size: u32,
    /// Size of a chunk slot.
    pub chunk_size: u64,
    /// Size of each shard's WAL ring.
    pub wal_size: u64,
    /// How many shards (and WAL rings) the device is cut into.
    pub shard_count: u32,
    /// Copysets each shard can hold.
    pub max_copysets: u32,
    /// Bytes of the device the layout uses.
    pub device_size: u64,
}

/// Where one shard's structures are, in bytes from the start of the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShardLayout {
    /// The geometry this was computed from.
    pub geometry: Geometry,
    /// Which shard.
    pub shard: u32,
    /// Start of the shard's region.
    pub base: u64,
    /// The two anchor pages (WAL head and checkpoint generation).
    pub anchor: u64,
    /// The copyset page pairs.
    pub copysets: u64,
    /// The chunk metadata page pairs.
    pub meta: u64,
    /// How many metadata pages (each stored twice).
    pub meta_pages: u32,
    /// The page bitmaps, two copies per slot.
    pub bitmaps: u64,
    /// The WAL ring.
    pub wal: u64,
    /// The first chunk slot.
    pub chunks: u64,
    /// How many chunk slots.
    pub slots: u32,
}

impl Geometry {
    /// Metadata entries in one page.
    pub fn entries_per_page(&self) -> u32 {
        ((self.page_size as usize - PAGE_HEADER_LEN) / META_ENTRY_LEN) as u32
    }

    /// Pages in one chunk.
    pub fn pages_per_chunk(&self) -> u32 {
        (self.chunk_size / u64::from(self.page_size)) as u32
    }

    /// Checks what the layout depends on, with a message that names the problem.
    pub fn validate(&self) -> Result<(), StorageError> {
        let bad = |reason: String| Err(StorageError::Geometry(reason));
        let page = u64::from(self.page_size);
        if !self.block_size.is_power_of_two() || self.block_size < 512 {
            return bad(format!(
                "block size {} is not a power of two of at least 512",
                self.block_size
            ));
        }
        if !self.page_size.is_power_of_two()
            || self.page_size < self.block_size
            || !(4096..=65536).contains(&self.page_size)
        {
            return bad(format!(
                "page size {} must be a power of two from 4 KiB to 64 KiB and at least the \
                 block size {}",
                self.page_size, self.block_size
            ));
        }
        if self.chunk_size == 0 || self.chunk_size % page != 0 {
            return bad(format!(
                "chunk size {} is not a non-zero multiple of the page size {}",
                self.chunk_size, self.page_size
            ));
        }
        let bitmap_bits = (self.page_size as usize - PAGE_HEADER_LEN) * 8;
        if self.chunk_size / page > bitmap_bits as u64 {
            return bad(format!(
                "a chunk of {} has more pages than one bitmap page tracks ({bitmap_bits})",
                self.chunk_size
            ));
        }
        if self.wal_size < 16 * page || self.wal_size % page != 0 {
            return bad(format!(
                "WAL size {} is not a multiple of the page size of at least 16 pages",
                self.wal_size
            ));
        }
        if self.shard_count == 0 || self.max_copysets == 0 {
            return bad("shard count and copysets per shard must not be 0".into());
        }
        Ok(())
    }

    /// The layout of shard `shard`, or why the device cannot hold one.
    pub fn shard_layout(&self, shard: u32) -> Result<ShardLayout, StorageError> {
        self.validate()?;
        if shard >= self.shard_count {
            return Err(StorageError::Geometry(format!(
                "shard {shard} does not exist; the device has {} shards",
                self.shard_count
            )));
        }
        let page = u64::from(self.page_size);
        let usable = self.device_size.saturating_sub(SHARD_AREA_OFFSET);
        let region = usable / u64::from(self.shard_count) / page * page;
        let fixed = 2 * page + 2 * page * u64::from(self.max_copysets) + self.wal_size;
        let too_small = || {
            StorageError::Geometry(format!(
                "a device of {} bytes cannot hold {} shards of {} WAL bytes, {} copysets and \
                 at least one chunk of {} bytes each",
                self.device_size,
                self.shard_count,
                self.wal_size,
                self.max_copysets,
                self.chunk_size
            ))
        };
        let rest = region.checked_sub(fixed).ok_or_else(too_small)?;
        let per_page = u64::from(self.entries_per_page());
        let meta_bytes = |slots: u64| 2 * slots.div_ceil(per_page) * page;
        // The slot count is bounded by the bytes each slot needs, then lowered until the
        // metadata pages (rounded up) fit as well.
        let mut slots = rest / (self.chunk_size + 2 * page);
        while slots > 0 && meta_bytes(slots) + slots * (2 * page + self.chunk_size) > rest {
            slots -= 1;
        }
        let slots = u32::try_from(slots.min(u64::from(u32::MAX - 1))).map_err(|_| too_small())?;
        if slots == 0 {
            return Err(too_small());
        }
        let base = SHARD_AREA_OFFSET + u64::from(shard) * region;
        let anchor = base;
        let copysets = anchor + 2 * page;
        let meta = copysets + 2 * page * u64::from(self.max_copysets);
        let meta_pages = u64::from(slots).div_ceil(per_page) as u32;
        let bitmaps = meta + 2 * u64::from(meta_pages) * page;
        let wal = bitmaps + 2 * u64::from(slots) * page;
        let chunks = wal + self.wal_size;
        Ok(ShardLayout {
            geometry: *self,
            shard,
            base,
            anchor,
            copysets,
            meta,
            meta_pages,
            bitmaps,
            wal,
            chunks,
            slots,
        })
    }
}

impl ShardLayout {
    fn page(&self) -> u64 {
        u64::from(self.geometry.page_size)
    }

    /// Offset of copy `copy` (0 or 1) of the anchor.
    pub fn anchor_page(&self, copy: u8) -> u64 {
        self.anchor + u64::from(copy & 1) * self.page()
    }

    /// Offset of copy `copy` of copyset page `index`.
    pub fn copyset_page(&self, index: u32, copy: u8) -> u64 {
        self.copysets + (2 * u64::from(index) + u64::from(copy & 1)) * self.page()
    }

    /// Offset of copy `copy` of chunk metadata page `index`.
    pub fn meta_page(&self, index: u32, copy: u8) -> u64 {
        self.meta + (2 * u64::from(index) + u64::from(copy & 1)) * self.page()
    }

    /// Offset of copy `copy` of slot `slot`'s page bitmap.
    pub fn bitmap_page(&self, slot: u32, copy: u8) -> u64 {
        self.bitmaps + (2 * u64::from(slot) + u64::from(copy & 1)) * self.page()
    }

    /// Offset of slot `slot`'s first byte.
    pub fn slot_offset(&self, slot: u32) -> u64 {
        self.chunks + u64::from(slot) * self.geometry.chunk_size
    }

    /// The end of the shard's region (the last slot's end).
    pub fn end(&self) -> u64 {
        self.slot_offset(self.slots)
    }

    /// Bytes of metadata (everything but the WAL and the slots): what format zeroes.
    pub fn metadata_range(&self) -> (u64, u64) {
        (self.anchor, self.wal - self.anchor)
    }
}

/// The first page of the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Superblock {
    /// The format version that wrote the device.
    pub version: u32,
    /// The device's identity, fixed at format time.
    pub uuid: [u8; 16],
    /// The layout's parameters.
    pub geometry: Geometry,
}

const SUPERBLOCK_LEN: usize = 80;

impl Superblock {
    /// Encodes into the first bytes of `page` (the rest is left as it is: zeroes).
    pub fn encode(&self, page: &mut [u8]) {
        assert!(page.len() >= SUPERBLOCK_LEN);
        let mut w = Writer::new(page);
        w.u64(SUPERBLOCK_MAGIC);
        w.u32(self.version);
        w.u32(0); // checksum, filled below
        w.bytes(&self.uuid);
        let g = &self.geometry;
        w.u32(g.block_size);
        w.u32(g.page_size);
        w.u64(g.chunk_size);
        w.u64(g.wal_size);
        w.u32(g.shard_count);
        w.u32(g.max_copysets);
        w.u64(g.device_size);
        let crc = crc32c::crc32c(&page[16..SUPERBLOCK_LEN]) ^ crc32c::crc32c(&page[..12]);
        page[12..16].copy_from_slice(&crc.to_le_bytes());
    }

    /// Decodes and checks a superblock; the error says why the device is refused.
    pub fn decode(page: &[u8]) -> Result<Superblock, StorageError> {
        let bad = |reason: String| StorageError::BadSuperblock(reason);
        if page.len() < SUPERBLOCK_LEN {
            return Err(bad("the device is smaller than a superblock".into()));
        }
        let mut r = Reader::new(page);
        let magic = r.u64();
        if magic != SUPERBLOCK_MAGIC {
            return Err(bad(if magic == 0 {
                "no superblock: the device is not formatted".into()
            } else {
                format!("magic {magic:#018x} is not a chunkserver superblock")
            }));
        }
        let version = r.u32();
        let stored = r.u32();
        let crc = crc32c::crc32c(&page[16..SUPERBLOCK_LEN]) ^ crc32c::crc32c(&page[..12]);
        if stored != crc {
            return Err(bad(format!(
                "checksum {stored:#010x} does not match the contents ({crc:#010x})"
            )));
        }
        if version != FORMAT_VERSION {
            return Err(bad(format!(
                "format version {version} is not the version this build reads \
                 ({FORMAT_VERSION}); reformat the device or run a matching build"
            )));
        }
        let uuid = r.bytes16();
        let geometry = Geometry {
            block_size: r.u32(),
            page_size: r.u32(),
            chunk_size: r.u64(),
            wal_size: r.u64(),
            shard_count: r.u32(),
            max_copysets: r.u32(),
            device_size: r.u64(),
        };
        geometry
            .validate()
            .map_err(|e| bad(format!("recorded geometry is invalid: {e}")))?;
        Ok(Superblock {
            version,
            uuid,
            geometry,
        })
    }
}

/// Little-endian writer over a slice whose size the caller checked.
pub(crate) struct Writer<'a> {
    buf: &'a mut [u8],
    at: usize,
}

impl<'a> Writer<'a> {
    pub(crate) fn new(buf: &'a mut [u8]) -> Writer<'a> {
        Writer { buf, at: 0 }
    }
    pub(crate) fn bytes(&mut self, bytes: &[u8]) {
        self.buf[self.at..self.at + bytes.len()].copy_from_slice(bytes);
        self.at += bytes.len();
    }
    pub(crate) fn u8(&mut self, v: u8) {
        self.bytes(&[v]);
    }
    pub(crate) fn u16(&mut self, v: u16) {
        self.bytes(&v.to_le_bytes());
    }
    pub(crate) fn u32(&mut self, v: u32) {
        self.bytes(&v.to_le_bytes());
    }
    pub(crate) fn u64(&mut self, v: u64) {
        self.bytes(&v.to_le_bytes());
    }
}

/// Little-endian reader that never panics: reading past the end yields zeroes and sets a
/// flag the caller checks once at the end.
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    at: usize,
    overrun: bool,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Reader<'a> {
        Reader {
            buf,
            at: 0,
            overrun: false,
        }
    }
    /// The next `len` bytes, or `None` (and the overrun flag) past the end.
    pub(crate) fn take(&mut self, len: usize) -> Option<&'a [u8]> {
        let out = self
            .at
            .checked_add(len)
            .and_then(|end| self.buf.get(self.at..end));
        match out {
            Some(bytes) => {
                self.at += len;
                Some(bytes)
            }
            None => {
                self.overrun = true;
                None
            }
        }
    }
    fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0; N];
        if let Some(bytes) = self.take(N) {
            out.copy_from_slice(bytes);
        }
        out
    }
    pub(crate) fn bytes16(&mut self) -> [u8; 16] {
        self.array()
    }
    pub(crate) fn u8(&mut self) -> u8 {
        self.array::<1>()[0]
    }
    pub(crate) fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.array())
    }
    pub(crate) fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.array())
    }
    pub(crate) fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.array())
    }
    /// Whether any read went past the end.
    pub(crate) fn overrun(&self) -> bool {
        self.overrun
    }
}

/// What a checksummed metadata page holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum PageKind {
    /// The WAL anchor.
    Anchor = 1,
    /// One copyset's checkpoint.
    Copyset = 2,
    /// A page of chunk metadata entries.
    ChunkMeta = 3,
    /// A slot's page bitmap.
    Bitmap = 4,
}

/// "PGv1" as a little-endian u32.
pub const PAGE_MAGIC: u32 = u32::from_le_bytes(*b"PGv1");

/// A checksummed page as read back: which generation, and its body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PageRead<'a> {
    /// All zeroes: never written since format.
    Blank,
    /// A valid page.
    Valid {
        /// The checkpoint generation that wrote it.
        generation: u64,
        /// Its body (after the header).
        body: &'a [u8],
    },
    /// Anything else: torn or corrupt.
    Corrupt(String),
}

/// Writes the page header (magic, crc, generation, number, kind) around a body already in
/// `page[PAGE_HEADER_LEN..]`.
pub fn seal_page(page: &mut [u8], kind: PageKind, number: u64, generation: u64) {
    assert!(page.len() > PAGE_HEADER_LEN);
    let mut w = Writer::new(&mut page[..PAGE_HEADER_LEN]);
    w.u32(PAGE_MAGIC);
    w.u32(0);
    w.u64(generation);
    w.u64(number);
    w.u8(kind as u8);
    let crc = crc32c::crc32c(&page[8..]);
    page[4..8].copy_from_slice(&crc.to_le_bytes());
}

/// Checks a page read back from the device.
pub fn open_page(page: &[u8], kind: PageKind, number: u64) -> PageRead<'_> {
    if page.len() <= PAGE_HEADER_LEN {
        return PageRead::Corrupt("page shorter than its header".into());
    }
    if page.iter().all(|b| *b == 0) {
        return PageRead::Blank;
    }
    let mut r = Reader::new(page);
    let magic = r.u32();
    let stored = r.u32();
    let generation = r.u64();
    let stored_number = r.u64();
    let stored_kind = r.u8();
    if magic != PAGE_MAGIC {
        return PageRead::Corrupt(format!("bad magic {magic:#010x}"));
    }
    let crc = crc32c::crc32c(&page[8..]);
    if crc != stored {
        return PageRead::Corrupt(format!(
            "checksum {stored:#010x} does not match the contents ({crc:#010x})"
        ));
    }
    if stored_kind != kind as u8 || stored_number != number {
        return PageRead::Corrupt(format!(
            "page holds kind {stored_kind} number {stored_number}, expected kind {} number \
             {number} (a misdirected write)",
            kind as u8
        ));
    }
    match page.get(PAGE_HEADER_LEN..) {
        Some(body) => PageRead::Valid { generation, body },
        None => PageRead::Corrupt("page shorter than its header".into()),
    }
}

/// Of the two copies of a page, the one to believe: the valid copy with the highest
/// generation not newer than the anchor's (a newer one belongs to a checkpoint that did not
/// finish). Returns the copy index and its body (`None` for a blank page).
pub fn choose_copy<'a>(
    copies: [PageRead<'a>; 2],
    anchor_generation: u64,
) -> Result<(u8, u64, Option<&'a [u8]>), String> {
    let mut best: Option<(u8, u64, Option<&'a [u8]>)> = None;
    let mut reasons = Vec::new();
    for (index, copy) in copies.into_iter().enumerate() {
        let candidate = match copy {
            PageRead::Blank => (index as u8, 0, None),
            PageRead::Valid { generation, body } if generation <= anchor_generation => {
                (index as u8, generation, Some(body))
            }
            PageRead::Valid { .. } => continue,
            PageRead::Corrupt(reason) => {
                reasons.push(format!("copy {index}: {reason}"));
                continue;
            }
        };
        if best.as_ref().map_or(true, |b| candidate.1 > b.1) {
            best = Some(candidate);
        }
    }
    best.ok_or_else(|| reasons.join("; "))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn geometry(device_size: u64, shards: u32) -> Geometry {
        Geometry {
            block_size: 4096,
            page_size: 4096,
            chunk_size: 16 << 20,
            wal_size: 256 << 20,
            shard_count: shards,
            max_copysets: DEFAULT_MAX_COPYSETS,
            device_size,
        }
    }

    #[test]
    fn shard_regions_are_disjoint_ordered_and_fit_the_device() {
        for (size, shards) in [(8u64 << 30, 1), (64 << 30, 4), (4 << 40, 16), (3 << 30, 2)] {
            let g = geometry(size, shards);
            let mut previous_end = SHARD_AREA_OFFSET;
            for shard in 0..shards {
                let l = g.shard_layout(shard).unwrap();
                assert!(l.base >= previous_end);
                assert!(l.anchor < l.copysets && l.copysets < l.meta && l.meta < l.bitmaps);
                assert!(l.bitmaps < l.wal && l.wal + g.wal_size == l.chunks);
                let entries = u64::from(l.meta_pages) * u64::from(g.entries_per_page());
                assert!(entries >= u64::from(l.slots));
                assert!(l.end() <= size, "{size} {shards} {shard}");
                assert_eq!(l.chunks % 4096, 0);
                previous_end = l.end();
            }
        }
    }

    #[test]
    fn a_device_too_small_is_refused_with_the_reason() {
        let error = geometry(200 << 20, 1).shard_layout(0).unwrap_err();
        assert!(error.to_string().contains("cannot hold"), "{error}");
        let mut g = geometry(8 << 30, 1);
        g.chunk_size = 10_000;
        assert!(g
            .shard_layout(0)
            .unwrap_err()
            .to_string()
            .contains("chunk size"));
        assert!(geometry(8 << 30, 1).shard_layout(1).is_err());
    }

    #[test]
    fn superblock_round_trips_and_refuses_damage() {
        let sb = Superblock {
            version: FORMAT_VERSION,
            uuid: [7; 16],
            geometry: geometry(8 << 30, 2),
        };
        let mut page = vec![0u8; 4096];
        sb.encode(&mut page);
        assert_eq!(Superblock::decode(&page).unwrap(), sb);

        let mut flipped = page.clone();
        flipped[40] ^= 1;
        let error = Superblock::decode(&flipped).unwrap_err().to_string();
        assert!(error.contains("checksum"), "{error}");

        let mut other_version = sb;
        other_version.version = 9;
        let mut page9 = vec![0u8; 4096];
        other_version.encode(&mut page9);
        let error = Superblock::decode(&page9).unwrap_err().to_string();
        assert!(error.contains("version 9"), "{error}");

        let error = Superblock::decode(&[0u8; 4096]).unwrap_err().to_string();
        assert!(error.contains("not formatted"), "{error}");
    }

    #[test]
    fn pages_detect_corruption_and_the_newest_committed_copy_wins() {
        fn read(p: &[u8]) -> PageRead<'_> {
            open_page(p, PageKind::ChunkMeta, 3)
        }
        let mut a = vec![0u8; 4096];
        a[PAGE_HEADER_LEN] = 1;
        seal_page(&mut a, PageKind::ChunkMeta, 3, 5);
        let mut b = vec![0u8; 4096];
        b[PAGE_HEADER_LEN] = 2;
        seal_page(&mut b, PageKind::ChunkMeta, 3, 6);
        let (copy, generation, _) = choose_copy([read(&a), read(&b)], 6).unwrap();
        assert_eq!((copy, generation), (1, 6));
        // Generation 6 belongs to a checkpoint that never finished when the anchor says 5.
        let (copy, generation, _) = choose_copy([read(&a), read(&b)], 5).unwrap();
        assert_eq!((copy, generation), (0, 5));
        let mut torn = b.clone();
        torn[8..16].fill(0xee);
        assert!(matches!(read(&torn), PageRead::Corrupt(_)));
        let (copy, _, _) = choose_copy([read(&a), read(&torn)], 6).unwrap();
        assert_eq!(copy, 0);
        let mut torn_a = a.clone();
        torn_a[100] ^= 0xff;
        let error = choose_copy([read(&torn_a), read(&torn)], 6).unwrap_err();
        assert!(
            error.contains("copy 0") && error.contains("copy 1"),
            "{error}"
        );
        assert!(matches!(
            open_page(&a, PageKind::Copyset, 3),
            PageRead::Corrupt(_)
        ));
        assert!(matches!(read(&[0u8; 4096]), PageRead::Blank));
    }
}

//! Identifiers that cross module boundaries, as newtypes so they cannot be mixed up. A leaf
//! module: the wire protocol, the storage layout and the copysets all name them from here.
//! Their widths are fixed by the formats that carry them (u64 in the WAL record header, the
//! chunk table and the frame header).

/// A chunk's cluster-wide id.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ChunkId(pub u64);

impl std::fmt::Display for ChunkId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// A copyset (a raft group).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CopysetId(pub u64);

/// The metadata copyset (the volume table and the placement service's tables): the id it has
/// on the wire and on disk, `2^64 − 2`, and the name a person reads and types, `meta`.
pub const METADATA_COPYSET: CopysetId = CopysetId(u64::MAX - 1);

impl std::fmt::Display for CopysetId {
    /// The metadata copyset as `meta`, any other as its number.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if *self == METADATA_COPYSET {
            f.pad("meta")
        } else {
            f.pad(&self.0.to_string())
        }
    }
}

impl std::str::FromStr for CopysetId {
    type Err = String;

    /// `meta` or a number.
    fn from_str(text: &str) -> Result<CopysetId, String> {
        if text == "meta" {
            return Ok(METADATA_COPYSET);
        }
        text.parse::<u64>()
            .map(CopysetId)
            .map_err(|_| format!("copyset {text:?}: expected a copyset id (a number) or meta"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_metadata_copyset_reads_and_parses_as_meta() {
        assert_eq!(METADATA_COPYSET.to_string(), "meta");
        assert_eq!(format!("{:>6}", METADATA_COPYSET), "  meta");
        assert_eq!(CopysetId(7).to_string(), "7");
        assert_eq!(format!("{:>4}", CopysetId(7)), "   7");
        assert_eq!("meta".parse::<CopysetId>(), Ok(METADATA_COPYSET));
        assert_eq!(
            "18446744073709551614".parse::<CopysetId>(),
            Ok(METADATA_COPYSET)
        );
        assert_eq!("42".parse::<CopysetId>(), Ok(CopysetId(42)));
        assert!("metadata".parse::<CopysetId>().is_err());
    }
}

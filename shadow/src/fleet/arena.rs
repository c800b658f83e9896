//! Many small byte strings kept end to end in one buffer: no allocation (and
//! no allocator rounding) per string, and strings put in slot order are read
//! in memory order by a scan, which is what makes a search over a million
//! shadows take milliseconds instead of a cache miss per shadow.
//!
//! A replaced string leaves a hole; once holes are most of the buffer, the
//! owner compacts it, which also restores slot order.

/// Where one string is. 8 bytes: an arena holds up to 4 GiB.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Span {
    at: u32,
    len: u32,
}

impl Span {
    pub fn len(self) -> usize {
        self.len as usize
    }
}

/// The buffer.
#[derive(Debug, Default)]
pub struct Arena {
    bytes: Vec<u8>,
    /// Bytes no span refers to any more.
    holes: usize,
}

/// Holes below this are never worth a compaction.
const MIN_HOLES: usize = 1 << 20;

impl Arena {
    /// Stores `bytes`; `None` when the arena is full.
    pub fn put(&mut self, bytes: &[u8]) -> Option<Span> {
        let at = u32::try_from(self.bytes.len()).ok()?;
        let len = u32::try_from(bytes.len()).ok()?;
        at.checked_add(len)?;
        self.bytes.extend_from_slice(bytes);
        Some(Span { at, len })
    }

    pub fn get(&self, span: Span) -> &[u8] {
        let at = span.at as usize;
        self.bytes.get(at..at + span.len()).unwrap_or(&[])
    }

    /// The string at `span` is no longer used.
    pub fn free(&mut self, span: Span) {
        self.holes += span.len();
    }

    /// Whether holes are most of the buffer.
    pub fn wants_compaction(&self) -> bool {
        self.holes > MIN_HOLES && self.holes * 2 > self.bytes.len()
    }

    /// Rewrites the buffer with only the strings of `live`, in that order,
    /// updating each span.
    pub fn compact<'a>(&mut self, live: impl Iterator<Item = &'a mut Span>) {
        let mut bytes = Vec::with_capacity(self.bytes.len() - self.holes);
        for span in live {
            // Never more than before, which fit.
            let at = bytes.len() as u32;
            bytes.extend_from_slice(self.get(*span));
            span.at = at;
        }
        self.bytes = bytes;
        self.holes = 0;
    }

    /// Heap bytes held.
    pub fn capacity(&self) -> usize {
        self.bytes.capacity()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compaction_keeps_live_strings_and_drops_holes() {
        let mut arena = Arena::default();
        let mut spans: Vec<Span> = (0..4).flat_map(|i| arena.put(&[i; 1 << 19])).collect();
        assert!(!arena.wants_compaction());
        arena.free(spans.remove(0));
        arena.free(spans.remove(0));
        arena.free(spans[0]);
        spans[0] = arena.put(b"new").expect("room");
        assert!(arena.wants_compaction());
        arena.compact(spans.iter_mut());
        assert_eq!(arena.get(spans[0]), b"new");
        assert_eq!(arena.get(spans[1]), &[3; 1 << 19][..]);
        assert_eq!(arena.bytes.len(), 3 + (1 << 19));
        assert!(!arena.wants_compaction());
    }
}

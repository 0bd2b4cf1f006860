//! Frame envelope: `[len u32][request id u64][kind u16][payload]`, all little-endian.
//!
//! `len` counts every byte after the length field itself (header rest plus
//! payload), so a frame occupies `4 + len` bytes on the wire. See
//! `docs/protocol.md` for the byte-level layout.

use crate::DecodeError;

/// Bytes of the fixed frame header: length, request id and kind.
pub const HEADER_LEN: usize = 4 + 8 + 2;

/// Default maximum frame size (header included) accepted by every peer.
pub const DEFAULT_MAX_FRAME: u32 = 16 << 20;

/// A decoder's initial buffer (and what [`FrameDecoder::shrink`] usually
/// keeps).
pub const INITIAL_BUFFER: usize = 64 << 10;

/// A decoded frame header plus a borrowed payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawFrame<'a> {
    /// Request id chosen by the requester and echoed in the reply.
    pub id: u64,
    /// Frame kind (opcode for requests, reply kind for replies).
    pub kind: u16,
    /// Everything after the header.
    pub payload: &'a [u8],
}

/// Appends a frame header for a payload of `payload_len` bytes to `out`.
///
/// The caller appends exactly `payload_len` payload bytes afterwards.
pub fn put_header(out: &mut Vec<u8>, id: u64, kind: u16, payload_len: usize) {
    let len = (HEADER_LEN - 4 + payload_len) as u32;
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&id.to_le_bytes());
    out.extend_from_slice(&kind.to_le_bytes());
}

/// Starts a frame whose payload length is not yet known; returns the frame's
/// start so that [`finish_frame`] can patch the length in.
pub fn begin_frame(out: &mut Vec<u8>, id: u64, kind: u16) -> usize {
    let start = out.len();
    put_header(out, id, kind, 0);
    start
}

/// Patches the length of a frame started with [`begin_frame`].
pub fn finish_frame(out: &mut [u8], start: usize) {
    let len = (out.len() - start - 4) as u32;
    out[start..start + 4].copy_from_slice(&len.to_le_bytes());
}

/// Incremental frame decoder over a growable byte buffer (sans-IO).
///
/// The I/O driver copies received bytes into [`FrameDecoder::spare`], reports
/// them with [`FrameDecoder::filled`], then takes whole frames with
/// [`FrameDecoder::peek`] and [`FrameDecoder::consume`]. A frame whose length
/// field exceeds the maximum is an error before any of its payload is
/// buffered, so a peer cannot make us allocate more than `max_frame`; and
/// the buffer grows only by the bytes a read asks for, never to the size a
/// header merely claims, so a peer that sends half a large frame makes the
/// decoder hold about half of it. [`FrameDecoder::shrink`] gives memory back
/// after a large frame.
#[derive(Debug)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    start: usize,
    end: usize,
    max_frame: u32,
    peeked: usize,
}

impl FrameDecoder {
    /// A decoder accepting frames of at most `max_frame` bytes (header included).
    ///
    /// The buffer starts at [`INITIAL_BUFFER`] bytes, or `max_frame` if that
    /// is smaller (a peer that has not shaken hands costs a few KiB).
    pub fn new(max_frame: u32) -> Self {
        let max_frame = max_frame.max(HEADER_LEN as u32);
        FrameDecoder {
            buf: vec![0; (max_frame as usize).min(INITIAL_BUFFER)],
            start: 0,
            end: 0,
            max_frame,
            peeked: 0,
        }
    }

    /// Bytes of memory the buffer holds (its capacity).
    pub fn memory(&self) -> usize {
        self.buf.capacity()
    }

    /// How many bytes [`Self::spare`]`(min)` would add to [`Self::memory`]
    /// (0 if it fits in the buffer as it is), so that a caller with a
    /// memory budget can charge them first.
    pub fn growth_for(&self, min: usize) -> usize {
        let (_, end) = self.compaction(min);
        (end + min).saturating_sub(self.buf.capacity())
    }

    /// Whether [`Self::spare`]`(min)` moves the unconsumed bytes to the
    /// front, and where they end afterwards. They move when the buffer
    /// lacks room and they are at most a quarter of it (cheap); otherwise
    /// the buffer grows instead, so a stream of large frames is not copied
    /// over and over.
    fn compaction(&self, min: usize) -> (bool, usize) {
        let (start, end) = if self.start == self.end {
            (0, 0)
        } else {
            (self.start, self.end)
        };
        let live = end - start;
        let compact = self.buf.len() - end < min && start > 0 && live <= self.buf.len() / 4;
        (compact, if compact { live } else { end })
    }

    /// Gives memory back: if the buffer is larger than `keep` bytes and the
    /// unconsumed bytes fit in `keep`, they move to the front and the
    /// buffer shrinks to `keep`.
    pub fn shrink(&mut self, keep: usize) {
        let keep = keep.max(HEADER_LEN);
        let live = self.end - self.start;
        if self.buf.capacity() <= keep || live > keep || self.peeked != 0 {
            return;
        }
        move_to_front(&mut self.buf, self.start, self.end);
        self.start = 0;
        self.end = live;
        self.buf.truncate(keep);
        self.buf.shrink_to_fit();
    }

    /// The largest frame this decoder accepts.
    pub fn max_frame(&self) -> u32 {
        self.max_frame
    }

    /// Changes the largest frame accepted from now on.
    pub fn set_max_frame(&mut self, max_frame: u32) {
        self.max_frame = max_frame.max(HEADER_LEN as u32);
    }

    /// Free space to read into; at least `min` bytes (grows the buffer if needed).
    pub fn spare(&mut self, min: usize) -> &mut [u8] {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
        let (compact, end) = self.compaction(min);
        if compact {
            move_to_front(&mut self.buf, self.start, self.end);
            self.start = 0;
            self.end = end;
        }
        if self.buf.len() - self.end < min {
            // Exactly what this read needs: the capacity is reserved for it
            // alone, and zero-filled memory is memory held.
            let want = self.end + min;
            self.buf.reserve_exact(want - self.buf.len());
            self.buf.resize(want, 0);
        }
        &mut self.buf[self.end..]
    }

    /// Records that `n` bytes were written into the slice from [`Self::spare`].
    pub fn filled(&mut self, n: usize) {
        self.end = (self.end + n).min(self.buf.len());
    }

    /// Bytes buffered but not yet consumed.
    pub fn buffered(&self) -> usize {
        self.end - self.start
    }

    /// How many more bytes are needed to complete the next frame (at least 1
    /// when a frame is incomplete, 0 when one is ready).
    pub fn needed(&self) -> usize {
        let avail = self.end - self.start;
        if avail < 4 {
            return 4 - avail;
        }
        let len = u32::from_le_bytes(self.len_bytes()) as usize + 4;
        len.saturating_sub(avail)
    }

    fn len_bytes(&self) -> [u8; 4] {
        let mut b = [0u8; 4];
        b.copy_from_slice(&self.buf[self.start..self.start + 4]);
        b
    }

    /// The next complete frame, if one is buffered.
    ///
    /// Errors (oversized or undersized length field) are fatal for the
    /// connection: the stream cannot be resynchronised.
    pub fn peek(&mut self) -> Result<Option<RawFrame<'_>>, DecodeError> {
        let avail = self.end - self.start;
        if avail < 4 {
            return Ok(None);
        }
        let len = u32::from_le_bytes(self.len_bytes());
        if (len as usize) < HEADER_LEN - 4 {
            return Err(DecodeError::FrameTooShort(len));
        }
        if len.saturating_add(4) > self.max_frame {
            return Err(DecodeError::FrameTooLarge {
                len: len as u64 + 4,
                max: self.max_frame,
            });
        }
        let total = len as usize + 4;
        if avail < total {
            return Ok(None);
        }
        let f = &self.buf[self.start..self.start + total];
        let id = u64::from_le_bytes(f[4..12].try_into().map_err(|_| DecodeError::Truncated)?);
        let kind = u16::from_le_bytes(f[12..14].try_into().map_err(|_| DecodeError::Truncated)?);
        self.peeked = total;
        Ok(Some(RawFrame {
            id,
            kind,
            payload: &f[HEADER_LEN..],
        }))
    }

    /// Drops the frame last returned by [`Self::peek`].
    pub fn consume(&mut self) {
        self.start += self.peeked;
        self.peeked = 0;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }
}

/// Moves `buf[start..end]` to the front in 64-byte steps (forward, so the
/// overlap is safe; chunked for the reason in [`crate::copy`]).
fn move_to_front(buf: &mut [u8], start: usize, end: usize) {
    let mut tmp = [0u8; 64];
    let mut i = 0;
    while start + i < end {
        let n = (end - start - i).min(64);
        tmp[..n].copy_from_slice(&buf[start + i..start + i + n]);
        buf[i..i + n].copy_from_slice(&tmp[..n]);
        i += n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn move_to_front_overlapping() {
        let mut b: Vec<u8> = (0..=255).collect();
        move_to_front(&mut b, 10, 250);
        assert_eq!(
            &b[..240],
            &(10..250).map(|x| x as u8).collect::<Vec<_>>()[..]
        );
    }

    fn feed(d: &mut FrameDecoder, bytes: &[u8]) {
        let s = d.spare(bytes.len());
        s[..bytes.len()].copy_from_slice(bytes);
        d.filled(bytes.len());
    }

    #[test]
    fn roundtrip_split_anywhere() {
        let mut wire = Vec::new();
        for i in 0..5u64 {
            let start = begin_frame(&mut wire, i, 7);
            wire.extend(std::iter::repeat_n(i as u8, i as usize * 3));
            finish_frame(&mut wire, start);
        }
        for cut in 0..wire.len() {
            let mut d = FrameDecoder::new(1024);
            let mut got = Vec::new();
            for chunk in [&wire[..cut], &wire[cut..]] {
                feed(&mut d, chunk);
                while let Some(f) = d.peek().unwrap() {
                    got.push((f.id, f.kind, f.payload.to_vec()));
                    d.consume();
                }
            }
            assert_eq!(got.len(), 5);
            for (i, (id, kind, p)) in got.into_iter().enumerate() {
                assert_eq!(id, i as u64);
                assert_eq!(kind, 7);
                assert_eq!(p, vec![i as u8; i * 3]);
            }
        }
    }

    #[test]
    fn oversized_is_rejected_before_buffering() {
        let mut d = FrameDecoder::new(100);
        feed(&mut d, &1000u32.to_le_bytes());
        assert!(matches!(d.peek(), Err(DecodeError::FrameTooLarge { .. })));
        let mut d = FrameDecoder::new(100);
        feed(&mut d, &3u32.to_le_bytes());
        assert!(matches!(d.peek(), Err(DecodeError::FrameTooShort(3))));
    }

    #[test]
    fn memory_follows_received_bytes_and_shrinks() {
        let mut d = FrameDecoder::new(32 << 20);
        assert_eq!(d.memory(), INITIAL_BUFFER);
        // A header claiming 16 MiB, then 1 MiB of its payload in 64 KiB reads.
        let mut hdr = Vec::new();
        put_header(&mut hdr, 1, 2, 16 << 20);
        feed(&mut d, &hdr);
        let chunk = vec![7u8; 64 << 10];
        for _ in 0..16 {
            assert!(d.growth_for(chunk.len()) <= chunk.len());
            feed(&mut d, &chunk);
        }
        assert!(d.peek().unwrap().is_none());
        // About what arrived, not what the header claimed.
        assert!(
            d.memory() <= (1 << 20) + 2 * INITIAL_BUFFER,
            "{}",
            d.memory()
        );
        // Nothing shrinks under a partial frame larger than what is kept...
        d.shrink(INITIAL_BUFFER);
        assert!(d.memory() > INITIAL_BUFFER);
        // ...but once the bytes are gone, the buffer is small again.
        let mut d = FrameDecoder::new(32 << 20);
        let mut wire = Vec::new();
        let start = begin_frame(&mut wire, 9, 3);
        wire.extend(std::iter::repeat_n(1u8, 1 << 20));
        finish_frame(&mut wire, start);
        wire.extend_from_slice(&hdr[..5]);
        for c in wire.chunks(64 << 10) {
            feed(&mut d, c);
        }
        assert_eq!(d.peek().unwrap().unwrap().id, 9);
        d.consume();
        d.shrink(INITIAL_BUFFER);
        assert_eq!(d.memory(), INITIAL_BUFFER);
        assert_eq!(d.buffered(), 5);
        feed(&mut d, &hdr[5..]);
        assert_eq!(d.needed(), 16 << 20);
        assert_eq!(FrameDecoder::new(4096).memory(), 4096);
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 0..16)) {
            let mut d = FrameDecoder::new(256);
            for c in chunks {
                feed(&mut d, &c);
                while let Ok(Some(_)) = d.peek() {
                    d.consume();
                }
            }
        }
    }
}

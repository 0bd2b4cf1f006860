//! A Leap-style prefetcher over the stream of demand faults.
//!
//! It keeps the last few faulting page numbers, finds the majority stride
//! among their deltas with the Boyer–Moore vote, and, when a majority exists,
//! proposes the next `window` pages along that stride. The window adapts to
//! how much of the previous proposal was used: it doubles (up to the maximum)
//! when prefetched pages were used, and halves when none were. Without a
//! majority it falls back to the last delta with a window of one page only if
//! the previous window was useful, else it proposes nothing.
//!
//! The prefetcher is pure bookkeeping; the pager tells it about faults and
//! about prefetched pages that turned out to be used.

/// How many recent fault deltas the majority vote looks at.
pub const HISTORY: usize = 8;

/// A proposal: fetch `count` pages starting at `start`, stepping by `stride`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Proposal {
    pub start: u64,
    pub stride: i64,
    pub count: u32,
}

impl Proposal {
    /// The proposed page numbers, stopping at the bounds `[0, pages)`.
    pub fn pages(&self, pages: u64) -> impl Iterator<Item = u64> + '_ {
        let (start, stride) = (self.start as i128, self.stride as i128);
        (0..self.count as i128)
            .map(move |i| start + i * stride)
            .take_while(move |&p| p >= 0 && p < pages as i128)
            .map(|p| p as u64)
    }
}

/// The prefetcher's state.
#[derive(Debug, Clone)]
pub struct Leap {
    last: Option<u64>,
    deltas: [i64; HISTORY],
    filled: usize,
    next: usize,
    window: u32,
    max_window: u32,
    /// Pages proposed by the last proposal, and how many of them were used.
    outstanding: u32,
    used: u32,
}

impl Leap {
    /// A prefetcher that proposes at most `max_window` pages at a time
    /// (0 disables it).
    pub fn new(max_window: u32) -> Leap {
        Leap {
            last: None,
            deltas: [0; HISTORY],
            filled: 0,
            next: 0,
            window: 1,
            max_window,
            outstanding: 0,
            used: 0,
        }
    }

    /// The current window.
    pub fn window(&self) -> u32 {
        self.window
    }

    /// Records that `n` pages from an earlier proposal were used.
    pub fn used(&mut self, n: u32) {
        self.used = self.used.saturating_add(n);
    }

    /// Boyer–Moore majority vote over the recorded deltas; the candidate is
    /// returned only if it really holds more than half of them.
    pub fn majority(&self) -> Option<i64> {
        let d = &self.deltas[..self.filled];
        let mut cand = 0i64;
        let mut count = 0usize;
        for &x in d {
            if count == 0 {
                cand = x;
                count = 1;
            } else if x == cand {
                count += 1;
            } else {
                count -= 1;
            }
        }
        let n = d.iter().filter(|&&x| x == cand).count();
        (n >= 2 && n * 2 > d.len() && cand != 0).then_some(cand)
    }

    /// Records a demand fault on `page` and returns what to prefetch.
    pub fn on_fault(&mut self, page: u64) -> Option<Proposal> {
        if let Some(last) = self.last {
            let delta = page as i64 - last as i64;
            self.deltas[self.next] = delta;
            self.next = (self.next + 1) % HISTORY;
            self.filled = (self.filled + 1).min(HISTORY);
        }
        self.last = Some(page);
        if self.max_window == 0 {
            return None;
        }
        // Adapt the window to what the last proposal achieved.
        if self.outstanding > 0 {
            if self.used == 0 {
                self.window = (self.window / 2).max(1);
            } else if self.used * 2 >= self.outstanding {
                self.window = (self.window * 2).min(self.max_window);
            }
        }
        self.used = 0;
        self.outstanding = 0;
        let stride = self.majority()?;
        let count = self.window.min(self.max_window);
        self.outstanding = count;
        Some(Proposal {
            start: (page as i64 + stride).max(0) as u64,
            stride,
            count,
        })
    }
}

/// Most streams followed at once.
pub const MAX_STREAMS: usize = 4;

/// Several Leap prefetchers, one per stream of faults: a program that
/// scans three arrays side by side faults in three places in turn, which
/// one history would see as random. A fault joins the stream whose last
/// fault is nearest, within [`Streams::reach`] pages; otherwise it starts
/// a stream in the place of the one idle longest among those that have
/// not found a stride (so that random faults between them do not wipe out
/// established streams), or of the one idle longest.
#[derive(Debug, Clone)]
pub struct Streams<T> {
    streams: Vec<Stream<T>>,
    max_window: u32,
    min_reach: u64,
    clock: u64,
}

/// One stream: its prefetcher, its last fault, and what the pager keeps
/// about its last proposal.
#[derive(Debug, Clone)]
pub struct Stream<T> {
    /// The stream's prefetcher.
    pub leap: Leap,
    /// The pager's record of the stream's last proposal.
    pub last: Option<T>,
    page: u64,
    used_at: u64,
}

impl<T> Streams<T> {
    /// Streams whose prefetchers propose at most `max_window` pages;
    /// faults up to `min_reach` pages apart always count as one stream (a
    /// pager fetching several pages per fault passes twice its unit).
    pub fn new(max_window: u32, min_reach: u64) -> Streams<T> {
        Streams {
            streams: Vec::with_capacity(MAX_STREAMS),
            max_window,
            min_reach,
            clock: 0,
        }
    }

    /// How near (in pages) a fault must be to a stream's last one to
    /// continue it: twice the largest window, at least `min_reach` and 16.
    pub fn reach(&self) -> u64 {
        (2 * self.max_window as u64).max(self.min_reach).max(16)
    }

    /// The stream a fault on `page` belongs to (moved to `page`).
    pub fn stream(&mut self, page: u64) -> &mut Stream<T> {
        self.clock += 1;
        let reach = self.reach();
        let near = self
            .streams
            .iter()
            .enumerate()
            .filter(|(_, s)| s.page.abs_diff(page) <= reach)
            .min_by_key(|(_, s)| s.page.abs_diff(page))
            .map(|(i, _)| i);
        let i = match near {
            Some(i) => i,
            None if self.streams.len() < MAX_STREAMS => {
                self.streams.push(self.fresh(page));
                self.streams.len() - 1
            }
            None => {
                let (i, _) = self
                    .streams
                    .iter()
                    .enumerate()
                    .min_by_key(|(_, s)| (s.leap.majority().is_some(), s.used_at))
                    .expect("MAX_STREAMS > 0");
                self.streams[i] = self.fresh(page);
                i
            }
        };
        let s = &mut self.streams[i];
        s.page = page;
        s.used_at = self.clock;
        s
    }

    fn fresh(&self, page: u64) -> Stream<T> {
        Stream {
            leap: Leap::new(self.max_window),
            last: None,
            page,
            used_at: self.clock,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interleaved_sequential_streams_are_each_followed() {
        let mut st: Streams<()> = Streams::new(16, 2);
        let bases = [0u64, 1 << 20, 2 << 20];
        let mut proposals = [0; 3];
        for i in 0..40u64 {
            for (k, b) in bases.iter().enumerate() {
                let s = st.stream(b + i);
                if let Some(p) = s.leap.on_fault(b + i) {
                    assert_eq!(p.stride, 1);
                    assert_eq!(p.start, b + i + 1);
                    s.leap.used(p.count);
                    proposals[k] += 1;
                }
            }
        }
        assert!(proposals.iter().all(|&n| n > 30), "{proposals:?}");
        // One history alone never finds the streams' stride (it votes for
        // the jumps between them).
        let mut one = Leap::new(16);
        for i in 0..40u64 {
            for b in bases {
                if let Some(p) = one.on_fault(b + i) {
                    assert_ne!(p.stride, 1);
                }
            }
        }
    }

    #[test]
    fn random_faults_between_scans_leave_the_scans_alone() {
        let mut st: Streams<()> = Streams::new(16, 2);
        let mut x = 88172645463325252u64;
        let mut proposals = 0;
        for i in 0..200u64 {
            // A sequential scan, then three random faults, in turn.
            if let Some(p) = st.stream(i).leap.on_fault(i) {
                assert_eq!(p.stride, 1);
                proposals += 1;
            }
            for _ in 0..3 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let p = (1 << 20) + x % (1 << 30);
                let _ = st.stream(p).leap.on_fault(p);
            }
        }
        assert!(proposals > 190, "{proposals}");
    }

    #[test]
    fn random_faults_start_no_stream_that_proposes() {
        let mut st: Streams<()> = Streams::new(16, 2);
        let mut x = 88172645463325252u64;
        for _ in 0..1000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let p = x % (1 << 30);
            assert!(st.stream(p).leap.on_fault(p).is_none());
        }
        assert!(st.streams.len() <= MAX_STREAMS);
    }

    #[test]
    fn sequential_stream_is_detected_and_window_grows_with_use() {
        let mut l = Leap::new(32);
        let mut last = None;
        for p in 0..20u64 {
            if let Some(prop) = l.on_fault(p * 8) {
                assert_eq!(prop.stride, 8);
                assert_eq!(prop.start, p * 8 + 8);
                l.used(prop.count);
                last = Some(prop);
            }
        }
        assert_eq!(last.unwrap().count, 32, "window grew to the maximum");
    }

    #[test]
    fn negative_strides_work_and_stop_at_zero() {
        let mut l = Leap::new(8);
        let mut prop = None;
        for p in (10..20u64).rev() {
            prop = l.on_fault(p);
        }
        let prop = prop.unwrap();
        assert_eq!(prop.stride, -1);
        let pages: Vec<u64> = prop.pages(100).collect();
        assert_eq!(pages.first(), Some(&9));
        assert!(pages.iter().all(|&p| p < 10));
        // Near page zero the proposal stops at the start of the range.
        let near = Proposal {
            start: 2,
            stride: -3,
            count: 8,
        };
        assert_eq!(near.pages(100).collect::<Vec<_>>(), vec![2]);
    }

    #[test]
    fn random_stream_proposes_nothing() {
        let mut l = Leap::new(16);
        let seq = [5u64, 900, 17, 4000, 23, 77, 1500, 8, 333, 64, 2, 999];
        let proposals = seq.iter().filter_map(|&p| l.on_fault(p)).count();
        assert_eq!(proposals, 0);
    }

    #[test]
    fn majority_survives_noise() {
        let mut l = Leap::new(16);
        // Mostly +1 with an occasional jump, as an interleaved scan would give.
        let seq = [100u64, 101, 102, 103, 500, 104, 105, 106, 107];
        let mut last = None;
        for &p in &seq {
            last = l.on_fault(p);
        }
        assert_eq!(last.map(|p| p.stride), Some(1));
    }

    #[test]
    fn unused_prefetches_shrink_the_window() {
        let mut l = Leap::new(64);
        for p in 0..10u64 {
            if let Some(prop) = l.on_fault(p) {
                l.used(prop.count);
            }
        }
        let grown = l.window();
        assert!(grown >= 8);
        for p in 10..16u64 {
            l.on_fault(p); // nothing used
        }
        assert!(l.window() < grown);
        assert!(l.window() >= 1);
    }

    #[test]
    fn disabled_prefetcher_proposes_nothing() {
        let mut l = Leap::new(0);
        assert!((0..10u64).all(|p| l.on_fault(p).is_none()));
    }
}

//! Pager settings and how they are parsed from flags and the environment.

use std::fmt;
use std::str::FromStr;

use remora_proto::size::parse_size;

use crate::uffd::PAGE;

/// How much of a paged region may be resident locally.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Budget {
    /// A fixed number of bytes (rounded down to pages, at least a few pages).
    Bytes(u64),
    /// A share of the pages the program has touched so far (`0 < f <= 1`),
    /// so that "25%" keeps a quarter of the program's working memory local
    /// whatever its size.
    Fraction(f64),
}

impl FromStr for Budget {
    type Err = String;

    /// `25%`, `0.25` or a size (`512MiB`, `4096`).
    fn from_str(s: &str) -> Result<Budget, String> {
        let s = s.trim();
        if let Some(p) = s.strip_suffix('%') {
            let v: f64 = p
                .trim()
                .parse()
                .map_err(|_| format!("bad local memory {s:?}: expected a percentage like 25%"))?;
            if !(v > 0.0 && v <= 100.0) {
                return Err(format!(
                    "bad local memory {s:?}: a percentage must be in (0, 100]"
                ));
            }
            return Ok(Budget::Fraction(v / 100.0));
        }
        if s.contains('.') {
            let v: f64 = s
                .parse()
                .map_err(|_| format!("bad local memory {s:?}: expected 0.25, 25% or 512MiB"))?;
            if !(v > 0.0 && v <= 1.0) {
                return Err(format!(
                    "bad local memory {s:?}: a fraction must be in (0, 1]"
                ));
            }
            return Ok(Budget::Fraction(v));
        }
        let bytes = parse_size(s).map_err(|e| format!("bad local memory {s:?}: {e}"))?;
        if bytes < MIN_PAGES * PAGE as u64 {
            return Err(format!(
                "bad local memory {s:?}: at least {} KiB is needed",
                MIN_PAGES * PAGE as u64 / 1024
            ));
        }
        Ok(Budget::Bytes(bytes))
    }
}

impl fmt::Display for Budget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Budget::Bytes(b) => write!(f, "{b}"),
            Budget::Fraction(x) => write!(f, "{}%", x * 100.0),
        }
    }
}

/// The fewest pages a budget allows: enough for the handler to make progress
/// while the evictor works.
pub const MIN_PAGES: u64 = 4;

/// Settings of a paged region.
#[derive(Debug, Clone)]
pub struct PagerConfig {
    /// Local memory budget.
    pub budget: Budget,
    /// With a `Fraction` budget, the budget never drops below this many pages.
    pub min_pages: u64,
    /// Fault-handling threads reading the one userfaultfd.
    pub handlers: usize,
    /// Largest prefetch window in pages (0 turns prefetching off).
    pub prefetch_window: u32,
    /// Pages fetched per demand fault (1, 2, 4, …): the aligned group around
    /// the faulting page, for crude spatial locality.
    pub fetch_unit: u32,
    /// Share of the budget used as the second-chance (inactive) list. Pages
    /// there are unmapped but kept locally; touching one costs a local fault,
    /// not a fetch, and promotes it. 0 makes eviction FIFO.
    pub inactive_fraction: f64,
    /// Pages written back per batch.
    pub writeback_batch: usize,
}

impl Default for PagerConfig {
    fn default() -> Self {
        PagerConfig {
            budget: Budget::Fraction(1.0),
            min_pages: 256,
            handlers: 2,
            prefetch_window: 256,
            fetch_unit: 1,
            inactive_fraction: 0.25,
            writeback_batch: 64,
        }
    }
}

impl PagerConfig {
    /// Checks the settings.
    pub fn validate(&self) -> Result<(), String> {
        if self.handlers == 0 || self.handlers > 64 {
            return Err(format!("handlers must be 1..=64, not {}", self.handlers));
        }
        if !self.fetch_unit.is_power_of_two() || self.fetch_unit > 512 {
            return Err(format!(
                "fetch unit must be a power of two up to 512 pages, not {}",
                self.fetch_unit
            ));
        }
        if !(0.0..=0.9).contains(&self.inactive_fraction) {
            return Err(format!(
                "inactive fraction must be in [0, 0.9], not {}",
                self.inactive_fraction
            ));
        }
        if self.writeback_batch == 0 {
            return Err("write-back batch must be at least 1".into());
        }
        match self.budget {
            Budget::Fraction(f) if !(f > 0.0 && f <= 1.0) => {
                Err(format!("budget fraction {f} is not in (0, 1]"))
            }
            Budget::Bytes(b) if b < MIN_PAGES * PAGE as u64 => {
                Err(format!("budget {b} bytes is below {MIN_PAGES} pages"))
            }
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budgets_parse() {
        assert_eq!("25%".parse::<Budget>().unwrap(), Budget::Fraction(0.25));
        assert_eq!("0.5".parse::<Budget>().unwrap(), Budget::Fraction(0.5));
        assert_eq!(
            "512MiB".parse::<Budget>().unwrap(),
            Budget::Bytes(512 << 20)
        );
        for bad in ["0%", "101%", "abc", "1.5", "-3%", "4KiB", ""] {
            assert!(bad.parse::<Budget>().is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn config_checks() {
        assert!(PagerConfig::default().validate().is_ok());
        let bad = PagerConfig {
            fetch_unit: 3,
            ..PagerConfig::default()
        };
        assert!(bad.validate().is_err());
        let bad = PagerConfig {
            handlers: 0,
            ..PagerConfig::default()
        };
        assert!(bad.validate().is_err());
    }
}

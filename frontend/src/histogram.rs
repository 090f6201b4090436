//! The load generator's latency histogram: an HdrHistogram (the
//! `hdrhistogram` crate) of nanoseconds keeping three significant figures,
//! so every quantile, the minimum, the maximum and the mean are within 0.1%
//! of the exact value whatever the number of samples. It grows with the
//! largest latency recorded (about 120 KiB up to 10 ms), never with the
//! number of samples.

use std::time::Duration;

use hdrhistogram::Histogram;

/// Significant decimal digits kept of every value.
const SIGNIFICANT_FIGURES: u8 = 3;

/// Latencies in nanoseconds.
#[derive(Clone)]
pub struct LatencyHistogram(Histogram<u64>);

impl Default for LatencyHistogram {
    fn default() -> Self {
        // Auto-resizing: any u64 can be recorded, and any other
        // histogram's values added.
        LatencyHistogram(
            Histogram::new(SIGNIFICANT_FIGURES).expect("3 significant figures are supported"),
        )
    }
}

impl std::fmt::Debug for LatencyHistogram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LatencyHistogram")
            .field("count", &self.count())
            .field("min", &self.min_ns())
            .field("max", &self.max_ns())
            .finish()
    }
}

impl LatencyHistogram {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn record(&mut self, latency: Duration) {
        self.record_ns(u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX));
    }

    pub fn record_ns(&mut self, ns: u64) {
        self.0
            .record(ns)
            .expect("an auto-resizing histogram records any value");
    }

    pub fn merge(&mut self, other: &LatencyHistogram) {
        self.0
            .add(&other.0)
            .expect("an auto-resizing histogram takes any other's values");
    }

    pub fn count(&self) -> u64 {
        self.0.len()
    }

    /// The smallest latency recorded, to the histogram's precision; 0 when
    /// empty.
    pub fn min_ns(&self) -> u64 {
        self.0.min()
    }

    /// The largest latency recorded, to the histogram's precision; 0 when
    /// empty.
    pub fn max_ns(&self) -> u64 {
        if self.count() == 0 {
            0
        } else {
            self.0.max()
        }
    }

    /// The mean latency, to the histogram's precision; 0 when empty.
    pub fn mean_ns(&self) -> u64 {
        self.0.mean().round() as u64
    }

    /// The value at quantile `q` (0..=1): the ceil(q * count)-th smallest
    /// sample to the histogram's precision (the largest value counted with
    /// it, the smallest for q = 0, never beyond [`max_ns`](Self::max_ns));
    /// 0 when empty.
    pub fn quantile_ns(&self, q: f64) -> u64 {
        if self.count() == 0 {
            return 0;
        }
        self.0.value_at_quantile(q.clamp(0.0, 1.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Within 0.1% of `exact`: three significant figures.
    fn close(got: u64, exact: u64) -> bool {
        (got as f64 - exact as f64).abs() / exact as f64 <= 0.001
    }

    #[test]
    fn quantiles_within_precision() {
        let mut h = LatencyHistogram::new();
        for v in 1..=100_000u64 {
            h.record_ns(v * 10);
        }
        assert_eq!(h.count(), 100_000);
        for (q, exact) in [(0.5, 500_000), (0.99, 990_000), (0.999, 999_000)] {
            let got = h.quantile_ns(q);
            assert!(close(got, exact), "q{q}: {got} vs {exact}");
        }
        // The extremes are the samples themselves, to the precision: below
        // 2048 every value is exact.
        assert_eq!(h.quantile_ns(0.0), 10);
        assert_eq!(h.min_ns(), 10);
        assert_eq!(h.quantile_ns(1.0), h.max_ns());
        assert!(close(h.max_ns(), 1_000_000), "max {}", h.max_ns());
        assert!(close(h.mean_ns(), 500_005), "mean {}", h.mean_ns());
    }

    #[test]
    fn merge_adds_up() {
        let mut a = LatencyHistogram::new();
        let mut b = LatencyHistogram::new();
        a.record_ns(5);
        b.record(Duration::from_micros(3));
        a.merge(&b);
        assert_eq!(a.count(), 2);
        assert_eq!(a.min_ns(), 5);
        assert!(close(a.max_ns(), 3000), "max {}", a.max_ns());
        assert_eq!(a.quantile_ns(0.5), 5);
    }

    #[test]
    fn empty_is_zero() {
        let h = LatencyHistogram::new();
        assert_eq!(h.count(), 0);
        assert_eq!(h.quantile_ns(0.5), 0);
        assert_eq!(h.min_ns(), 0);
        assert_eq!(h.max_ns(), 0);
        assert_eq!(h.mean_ns(), 0);
    }

    #[test]
    fn any_latency_is_recorded() {
        let mut h = LatencyHistogram::new();
        h.record(Duration::MAX);
        h.record_ns(0);
        assert_eq!(h.count(), 2);
        assert_eq!(h.min_ns(), 0);
        assert!(h.quantile_ns(1.0) >= u64::MAX / 1000 * 999);
    }
}

//! A circuit breaker per provider: closed → (N consecutive failures) → open → (cool-down) →
//! half-open, where exactly one probe call is let through; its success closes the circuit, its
//! failure opens it for another cool-down.
//!
//! Design decision: admission returns a guard. A probe that never reports (the call was
//! skipped, cancelled or dropped before reaching the provider) gives its slot back on drop, so
//! a circuit can never stay half-open with no probe in flight.

use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Closed,
    Open { until: Instant },
    HalfOpen { probing: bool },
}

#[derive(Debug)]
struct Inner {
    state: State,
    consecutive_failures: u32,
}

/// One provider's breaker.
#[derive(Debug)]
pub struct Breaker {
    threshold: u32,
    cooldown: Duration,
    inner: Mutex<Inner>,
}

/// What a caller may do with the provider now.
#[must_use]
pub struct Admission<'a> {
    breaker: &'a Breaker,
    probe: bool,
    reported: bool,
}

/// A snapshot for `model.models`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Health {
    pub circuit: &'static str,
    pub consecutive_failures: u32,
}

impl Breaker {
    /// `threshold` 0 disables the breaker.
    pub fn new(threshold: u32, cooldown: Duration) -> Self {
        Self {
            threshold,
            cooldown,
            inner: Mutex::new(Inner {
                state: State::Closed,
                consecutive_failures: 0,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `None` while the circuit is open (or half-open with its probe in flight).
    pub fn admit(&self, now: Instant) -> Option<Admission<'_>> {
        let mut g = self.lock();
        let probe = match g.state {
            State::Closed => false,
            State::Open { until } if now >= until => {
                g.state = State::HalfOpen { probing: true };
                true
            }
            State::HalfOpen { probing: false } => {
                g.state = State::HalfOpen { probing: true };
                true
            }
            State::Open { .. } | State::HalfOpen { probing: true } => return None,
        };
        Some(Admission {
            breaker: self,
            probe,
            reported: false,
        })
    }

    pub fn health(&self, now: Instant) -> Health {
        let g = self.lock();
        let circuit = match g.state {
            State::Closed => "closed",
            State::Open { until } if now >= until => "half_open",
            State::Open { .. } => "open",
            State::HalfOpen { .. } => "half_open",
        };
        Health {
            circuit,
            consecutive_failures: g.consecutive_failures,
        }
    }

    fn success(&self) {
        let mut g = self.lock();
        g.state = State::Closed;
        g.consecutive_failures = 0;
    }

    fn failure(&self, now: Instant, probe: bool) {
        let mut g = self.lock();
        g.consecutive_failures = g.consecutive_failures.saturating_add(1);
        let open = self.threshold > 0
            && (probe
                || matches!(g.state, State::HalfOpen { .. })
                || g.consecutive_failures >= self.threshold);
        if open {
            g.state = State::Open {
                until: now + self.cooldown,
            };
        }
    }

    fn release_probe(&self) {
        let mut g = self.lock();
        if g.state == (State::HalfOpen { probing: true }) {
            g.state = State::HalfOpen { probing: false };
        }
    }

    /// Whether the circuit is open right now (a retry should stop).
    pub fn is_open(&self, now: Instant) -> bool {
        matches!(self.lock().state, State::Open { until } if now < until)
    }
}

impl Admission<'_> {
    /// The provider answered properly (a 4xx about the request counts: the provider is up).
    pub fn success(&mut self) {
        self.reported = true;
        self.breaker.success();
    }

    /// The provider failed (connect error, timeout, 429, 5xx, garbage).
    pub fn failure(&mut self, now: Instant) {
        self.reported = true;
        self.breaker.failure(now, self.probe);
        // A probe is answered once; later attempts in this call are ordinary.
        self.probe = false;
    }

    pub fn is_probe(&self) -> bool {
        self.probe
    }
}

impl Drop for Admission<'_> {
    fn drop(&mut self) {
        if self.probe && !self.reported {
            self.breaker.release_probe();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_n_failures_and_probes_after_cooldown() {
        let b = Breaker::new(2, Duration::from_secs(10));
        let t0 = Instant::now();
        b.admit(t0).expect("closed").failure(t0);
        assert_eq!(b.health(t0).circuit, "closed");
        b.admit(t0).expect("closed").failure(t0);
        assert_eq!(b.health(t0).circuit, "open");
        assert!(b.admit(t0).is_none());
        assert!(b.admit(t0 + Duration::from_secs(9)).is_none());
        let t1 = t0 + Duration::from_secs(10);
        let mut probe = b.admit(t1).expect("probe");
        assert!(probe.is_probe());
        // Only one probe at a time.
        assert!(b.admit(t1).is_none());
        probe.failure(t1);
        drop(probe);
        assert!(b.admit(t1).is_none(), "reopened for another cool-down");
        let t2 = t1 + Duration::from_secs(10);
        b.admit(t2).expect("probe").success();
        assert_eq!(b.health(t2).circuit, "closed");
        assert_eq!(b.health(t2).consecutive_failures, 0);
        assert!(!b.admit(t2).expect("closed").is_probe());
    }

    #[test]
    fn an_unreported_probe_gives_its_slot_back() {
        let b = Breaker::new(1, Duration::from_millis(0));
        let t = Instant::now();
        b.admit(t).expect("closed").failure(t);
        let p = b.admit(t).expect("probe");
        assert!(b.admit(t).is_none());
        drop(p);
        assert!(b.admit(t).expect("probe again").is_probe());
    }

    #[test]
    fn success_resets_the_count_and_zero_threshold_never_opens() {
        let b = Breaker::new(2, Duration::from_secs(10));
        let t = Instant::now();
        b.admit(t).expect("a").failure(t);
        b.admit(t).expect("a").success();
        b.admit(t).expect("a").failure(t);
        assert_eq!(b.health(t).circuit, "closed");
        let off = Breaker::new(0, Duration::from_secs(10));
        for _ in 0..100 {
            off.admit(t).expect("never open").failure(t);
        }
        assert_eq!(off.health(t).circuit, "closed");
    }
}

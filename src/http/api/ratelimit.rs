//! A per-caller token bucket (`--rate-limit-per-second`, `--rate-limit-burst`):
//! over the limit, 429 with `Retry-After`. Buckets live in this replica's
//! memory, so with N replicas a caller may reach N times the rate.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use super::errors::ApiError;

const MAX_BUCKETS: usize = 100_000;

struct Bucket {
    tokens: f64,
    at: Instant,
}

pub struct RateLimiter {
    rate: f64,
    burst: f64,
    buckets: Mutex<HashMap<String, Bucket>>,
}

impl RateLimiter {
    /// None when the rate is 0 (no limit).
    pub fn new(per_second: f64, burst: Option<u32>) -> Option<Self> {
        if per_second.is_nan() || per_second <= 0.0 || !per_second.is_finite() {
            return None;
        }
        let burst = burst.map(f64::from).unwrap_or(per_second).max(1.0);
        Some(RateLimiter { rate: per_second, burst, buckets: Mutex::new(HashMap::new()) })
    }

    /// Takes one token from `caller`'s bucket, or says how long to wait.
    pub fn check(&self, caller: &str) -> Result<(), ApiError> {
        self.check_at(caller, Instant::now())
    }

    fn check_at(&self, caller: &str, now: Instant) -> Result<(), ApiError> {
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if buckets.len() >= MAX_BUCKETS && !buckets.contains_key(caller) {
            // Forget callers whose bucket has refilled: they lose nothing.
            let (rate, burst) = (self.rate, self.burst);
            buckets.retain(|_, b| b.tokens + now.duration_since(b.at).as_secs_f64() * rate < burst);
        }
        let bucket = buckets.entry(caller.to_string()).or_insert(Bucket { tokens: self.burst, at: now });
        bucket.tokens = (bucket.tokens + now.saturating_duration_since(bucket.at).as_secs_f64() * self.rate).min(self.burst);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            let wait = (1.0 - bucket.tokens) / self.rate;
            Err(ApiError::RateLimited { retry_after: wait.ceil().max(1.0) as u64 })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn off_by_default() {
        assert!(RateLimiter::new(0.0, None).is_none());
        assert!(RateLimiter::new(f64::NAN, None).is_none());
    }

    #[test]
    fn limits_each_caller_and_refills() {
        let limiter = RateLimiter::new(2.0, Some(3)).unwrap();
        let t0 = Instant::now();
        for _ in 0..3 {
            limiter.check_at("a", t0).unwrap();
        }
        assert!(matches!(limiter.check_at("a", t0), Err(ApiError::RateLimited { retry_after: 1 })));
        limiter.check_at("b", t0).unwrap();
        limiter.check_at("a", t0 + Duration::from_millis(600)).unwrap();
        assert!(limiter.check_at("a", t0 + Duration::from_millis(600)).is_err());
    }
}

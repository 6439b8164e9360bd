//! Retry timing: exponential backoff with jitter, and the receiver's Retry-After.

use std::time::{Duration, SystemTime};

use crate::resources::channel::RetrySettings;

/// Attempts in all when the Channel does not say (the first included).
pub const DEFAULT_MAX_ATTEMPTS: u32 = 5;
/// The first backoff when the Channel does not say.
pub const DEFAULT_INITIAL_BACKOFF: Duration = Duration::from_millis(500);
/// No backoff grows beyond this: a delivery holds its recipient's slot in the
/// run while it waits, so waits stay bounded.
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// The longest Retry-After herald honours; a receiver asking for more gets
/// its next attempt after this long (a delivery must not park a run's slot for hours).
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(300);

/// How often and how patiently a channel retries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    pub max_attempts: u32,
    pub initial_backoff: Duration,
}

impl RetryPolicy {
    /// The Channel's settings with defaults; out-of-range values are clamped
    /// (the CRD schema already bounds them).
    pub fn for_channel(settings: &RetrySettings) -> Self {
        let max_attempts = settings.max_attempts.map_or(DEFAULT_MAX_ATTEMPTS, |m| m.clamp(1, crate::resources::channel::MAX_ATTEMPTS) as u32);
        let initial_backoff =
            settings.initial_backoff_ms.and_then(|ms| u64::try_from(ms).ok()).filter(|ms| *ms > 0).map_or(DEFAULT_INITIAL_BACKOFF, Duration::from_millis).min(MAX_BACKOFF);
        RetryPolicy { max_attempts, initial_backoff }
    }

    /// The wait after failed attempt `attempt` (1 = the first): the initial
    /// backoff doubled each attempt, capped, with "equal jitter" (half fixed,
    /// half random) so that many recipients failing together against the
    /// same receiver do not retry in lockstep.
    pub fn backoff(&self, attempt: u32) -> Duration {
        let factor = 1u32.checked_shl(attempt.saturating_sub(1).min(20)).unwrap_or(u32::MAX);
        let full = self.initial_backoff.saturating_mul(factor).min(MAX_BACKOFF);
        let half = full / 2;
        let jitter_ms = fastrand::u64(0..=half.as_millis().min(u64::MAX as u128) as u64);
        half + Duration::from_millis(jitter_ms)
    }

    /// The wait before the next attempt: the receiver's Retry-After when it
    /// gave one (capped at [`MAX_RETRY_AFTER`]), else the backoff.
    pub fn wait(&self, attempt: u32, retry_after: Option<Duration>) -> Duration {
        match retry_after {
            Some(d) => d.min(MAX_RETRY_AFTER),
            None => self.backoff(attempt),
        }
    }
}

/// Parses a Retry-After header: delay-seconds or an HTTP date (RFC 9110 §10.2.3).
/// A date in the past means "now".
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let when = httpdate::parse_http_date(value).ok()?;
    Some(when.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_and_is_capped() {
        let policy = RetryPolicy { max_attempts: 5, initial_backoff: Duration::from_millis(100) };
        for _ in 0..50 {
            let first = policy.backoff(1);
            assert!(first >= Duration::from_millis(50) && first <= Duration::from_millis(100), "{first:?}");
            let third = policy.backoff(3);
            assert!(third >= Duration::from_millis(200) && third <= Duration::from_millis(400), "{third:?}");
            assert!(policy.backoff(40) <= MAX_BACKOFF);
            assert!(policy.backoff(40) >= MAX_BACKOFF / 2);
        }
    }

    #[test]
    fn retry_after_wins_but_is_capped() {
        let policy = RetryPolicy { max_attempts: 5, initial_backoff: Duration::from_millis(100) };
        assert_eq!(policy.wait(1, Some(Duration::from_secs(2))), Duration::from_secs(2));
        assert_eq!(policy.wait(1, Some(Duration::from_secs(86_400))), MAX_RETRY_AFTER);
    }

    #[test]
    fn retry_after_parses_seconds_and_dates() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_445_412_480); // Wed, 21 Oct 2015 07:28:00 GMT
        assert_eq!(parse_retry_after(" 3 ", now), Some(Duration::from_secs(3)));
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:28:10 GMT", now), Some(Duration::from_secs(10)));
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:27:00 GMT", now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("-1", now), None);
    }

    #[test]
    fn channel_settings_have_defaults() {
        let p = RetryPolicy::for_channel(&RetrySettings::default());
        assert_eq!((p.max_attempts, p.initial_backoff), (5, DEFAULT_INITIAL_BACKOFF));
        let p = RetryPolicy::for_channel(&RetrySettings { max_attempts: Some(99), initial_backoff_ms: Some(-4) });
        assert_eq!((p.max_attempts, p.initial_backoff), (20, DEFAULT_INITIAL_BACKOFF));
    }
}

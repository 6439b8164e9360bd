//! Request signatures for http and chat channels.
//!
//! When a Channel's Secret has a `signingKey`, every attempt carries
//!
//! ```text
//! X-Herald-Timestamp: <unix seconds of this attempt>
//! X-Herald-Signature: v1=<hex HMAC-SHA256(signingKey, "<timestamp>.<body>")>
//! ```
//!
//! A receiver recomputes the HMAC over the timestamp header, a `.`, and the
//! raw request body, compares it in constant time, and rejects timestamps too
//! far from its clock (replays). The scheme is versioned (`v1=`) so that a new
//! one can be sent next to it, and the timestamp is fresh on every retry.

use hmac::{Hmac, Mac};
use sha2::Sha256;

pub const TIMESTAMP_HEADER: &str = "X-Herald-Timestamp";
pub const SIGNATURE_HEADER: &str = "X-Herald-Signature";
pub const IDEMPOTENCY_HEADER: &str = "Idempotency-Key";

/// The `X-Herald-Signature` value for `body` sent at `timestamp` (unix seconds).
pub fn signature(key: &[u8], timestamp: u64, body: &[u8]) -> String {
    format!("v1={}", hex(&mac(key, timestamp, body)))
}

/// Checks a signature header (any of several comma-separated `v1=` values
/// matches) in constant time. For receivers written in Rust, and for tests.
pub fn verify(key: &[u8], timestamp: u64, body: &[u8], header: &str) -> bool {
    header.split(',').filter_map(|part| part.trim().strip_prefix("v1=")).any(|given| {
        let Some(given) = unhex(given) else { return false };
        let mut m = new_mac(key);
        m.update(format!("{timestamp}.").as_bytes());
        m.update(body);
        m.verify_slice(&given).is_ok()
    })
}

fn new_mac(key: &[u8]) -> Hmac<Sha256> {
    // HMAC accepts keys of any length; new_from_slice cannot fail for it.
    <Hmac<Sha256> as Mac>::new_from_slice(key).unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"))
}

fn mac(key: &[u8], timestamp: u64, body: &[u8]) -> Vec<u8> {
    let mut m = new_mac(key);
    m.update(format!("{timestamp}.").as_bytes());
    m.update(body);
    m.finalize().into_bytes().to_vec()
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[(b >> 4) as usize] as char);
        out.push(DIGITS[(b & 0xf) as usize] as char);
    }
    out
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_a_known_hmac() {
        // RFC 4231 test case 2: key "Jefe", data "what do ya want for nothing?".
        let mut m = new_mac(b"Jefe");
        m.update(b"what do ya want for nothing?");
        assert_eq!(hex(&m.finalize().into_bytes()), "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843");
    }

    #[test]
    fn signs_timestamp_dot_body_and_verifies() {
        let sig = signature(b"secret", 1_700_000_000, b"{\"a\":1}");
        assert!(sig.starts_with("v1=") && sig.len() == 3 + 64, "{sig}");
        assert!(verify(b"secret", 1_700_000_000, b"{\"a\":1}", &sig));
        assert!(verify(b"secret", 1_700_000_000, b"{\"a\":1}", &format!("v0=abc, {sig}")));
        assert!(!verify(b"secret", 1_700_000_001, b"{\"a\":1}", &sig), "another timestamp");
        assert!(!verify(b"secret", 1_700_000_000, b"{\"a\":2}", &sig), "another body");
        assert!(!verify(b"other", 1_700_000_000, b"{\"a\":1}", &sig), "another key");
        assert!(!verify(b"secret", 1_700_000_000, b"{\"a\":1}", "v1=zz"));
    }
}

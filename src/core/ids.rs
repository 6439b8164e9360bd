//! Identifier derivation.
//!
//! * Knock ids are arbitrary strings (`user_3`, `Jane.Doe@x`); Kubernetes names
//!   are DNS subdomains. [`resource_name`] keeps a valid id as it is and turns any
//!   other into a readable, hashed name, so different ids never share a name.
//!   Lookups always go by the id in spec, never by assuming name == id.
//! * A workflow recipient run id is a UUID v5 whose namespace is the workflow run
//!   id (the TriggerRun's uid, a UUID v4) and whose name is the recipient's
//!   canonical key (`user:<id>` or `object:<collection>:<id>`): stable across
//!   restarts and replicas, and different for every recipient of a run.

use sha2::{Digest, Sha256};
use uuid::Uuid;

use super::model::RecipientKey;

const MAX_NAME: usize = 253;

/// True when `s` is a valid Kubernetes object name (a DNS-1123 subdomain).
pub fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_NAME
        && s.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

/// A short, stable hash of a string (hex of SHA-256, first `len` characters).
pub fn short_hash(s: &str, len: usize) -> String {
    let digest = Sha256::digest(s.as_bytes());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    hex[..len.min(hex.len())].to_string()
}

/// Derives a valid metadata.name from one or more id parts (joined with `-`).
/// A name that is already valid and made of one part is kept as is;
/// anything else is lowercased, has other characters replaced by `-`, and
/// gets an 8-character hash of the exact parts appended.
pub fn resource_name(parts: &[&str]) -> String {
    if let [single] = parts {
        if is_dns_subdomain(single) && single.len() <= 63 {
            return single.to_string();
        }
    }
    let readable = readable_part(&parts.join("-"), 50);
    // The hash covers the parts with a separator that cannot occur in one
    // part's position, so ("a-b", "c") and ("a", "b-c") differ.
    let hash = short_hash(&parts.join("\u{0}"), 8);
    if readable.is_empty() {
        format!("x-{hash}")
    } else {
        format!("{readable}-{hash}")
    }
}

/// The readable part of a generated name: lowercased, other characters
/// replaced by `-`, runs of `-` collapsed, at most `max` characters, no `-`
/// at either end (empty when nothing readable is left).
pub fn readable_part(text: &str, max: usize) -> String {
    let mapped: String = text.chars().map(|c| c.to_ascii_lowercase()).map(|c| if c.is_ascii_lowercase() || c.is_ascii_digit() { c } else { '-' }).collect();
    let collapsed = mapped.split('-').filter(|p| !p.is_empty()).collect::<Vec<_>>().join("-");
    collapsed.chars().take(max).collect::<String>().trim_end_matches('-').to_string()
}

/// The metadata.name for a user, tenant, audience with this id.
pub fn name_for_id(id: &str) -> String {
    resource_name(&[id])
}

/// The metadata.name for an object: `<collection>-<id>`, hashed when needed.
pub fn name_for_object(collection: &str, id: &str) -> String {
    let joined = format!("{collection}-{id}");
    if is_dns_subdomain(&joined) && joined.len() <= 63 {
        joined
    } else {
        resource_name(&[collection, id])
    }
}

/// A label value standing for a resource name: the name itself when it fits
/// a label value (at most 63 characters), else its first 50 characters and a
/// hash of the whole name. Any valid name (up to 253 characters) gets one, so
/// labelling a resource after a long name never fails.
pub fn label_value(name: &str) -> String {
    const MAX_LABEL: usize = 63;
    if name.len() <= MAX_LABEL && is_label_value(name) {
        return name.to_string();
    }
    let readable: String = name.chars().filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_')).take(50).collect();
    let readable = readable.trim_matches(|c: char| !c.is_ascii_alphanumeric());
    let hash = short_hash(name, 12);
    if readable.is_empty() {
        hash
    } else {
        format!("{readable}-{hash}")
    }
}

fn is_label_value(s: &str) -> bool {
    s.is_empty()
        || (s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
            && s.starts_with(|c: char| c.is_ascii_alphanumeric())
            && s.ends_with(|c: char| c.is_ascii_alphanumeric()))
}

/// A recipient's workflow recipient run id (see the module docs).
pub fn recipient_run_id(workflow_run_id: &Uuid, recipient: &RecipientKey) -> Uuid {
    Uuid::new_v5(workflow_run_id, recipient.canonical().as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_names_are_kept() {
        assert_eq!(name_for_id("user-1"), "user-1");
        assert_eq!(name_for_id("a.b"), "a.b");
        assert_eq!(name_for_object("projects", "p1"), "projects-p1");
    }

    #[test]
    fn other_ids_become_readable_hashed_names() {
        let n = name_for_id("Jane.Doe@x");
        assert!(n.starts_with("jane-doe-x-"), "{n}");
        assert!(is_dns_subdomain(&n));
        assert_ne!(name_for_id("user_1"), name_for_id("user-1"));
        assert_ne!(name_for_id("user_1"), name_for_id("USER_1"));
        let long = "x".repeat(400);
        assert!(is_dns_subdomain(&name_for_id(&long)));
        assert!(is_dns_subdomain(&name_for_id("___")));
        assert!(is_dns_subdomain(&name_for_object("My Projects", "P 1")));
        assert_ne!(resource_name(&["a-b", "c"]), resource_name(&["a", "b-c"]));
    }

    #[test]
    fn every_name_has_a_label_value() {
        assert_eq!(label_value("new-comment-zhp6c"), "new-comment-zhp6c");
        let long = format!("{}.{}", "a".repeat(63), "b".repeat(63));
        let v = label_value(&long);
        assert!(v.len() <= 63 && is_label_value(&v), "{v}");
        assert_ne!(v, label_value(&format!("{}.{}", "a".repeat(63), "c".repeat(63))));
        let longest = ["x".repeat(63), "y".repeat(63), "z".repeat(63), "w".repeat(61)].join(".");
        assert_eq!(longest.len(), 253);
        assert!(is_label_value(&label_value(&longest)) && label_value(&longest).len() <= 63);
        assert!(is_label_value(&label_value(&format!("{}-", "a".repeat(60)))));
    }

    #[test]
    fn recipient_run_ids_are_stable_and_distinct() {
        let run = Uuid::parse_str("6f1c1c8e-8b0e-4d5e-9d7a-3a3f0f7b9e11").unwrap();
        let a = recipient_run_id(&run, &RecipientKey::user("user_1"));
        assert_eq!(a, recipient_run_id(&run, &RecipientKey::user("user_1")));
        assert_eq!(a.get_version_num(), 5);
        assert_ne!(a, recipient_run_id(&run, &RecipientKey::user("user_2")));
        assert_ne!(a, recipient_run_id(&run, &RecipientKey::object("user", "user_1")));
        let other = Uuid::new_v4();
        assert_ne!(a, recipient_run_id(&other, &RecipientKey::user("user_1")));
        // Pinned, so the derivation documented in the README cannot change silently.
        assert_eq!(a, Uuid::new_v5(&run, b"user:user_1"));
    }
}

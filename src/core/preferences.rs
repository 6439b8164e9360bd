//! Knock preference evaluation: whether a recipient's preference sets let a
//! workflow send a message through a channel type.
//!
//! Each applicable setting (the workflow's entry, each of its categories'
//! entries, the channel type's entry) is resolved on its own, by precedence:
//! the highest-precedence set that defines the entry decides it, and an entry no
//! set defines allows. The message is sent only if every resolved setting allows.

use super::model::{PreferenceSet, PreferenceSetting};

/// What is being sent: a workflow (with its categories) through a channel type.
#[derive(Debug, Clone, Copy)]
pub struct PreferenceQuery<'a> {
    pub workflow_key: &'a str,
    pub categories: &'a [String],
    pub channel_type: &'a str,
}

/// The outcome of evaluating preferences.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PreferenceDecision {
    Allowed,
    /// The recipient opted out; `setting` names the deciding entry, e.g.
    /// `workflows.new-comment`, `categories.collaboration.channel_types.email`
    /// or `channel_types.email`.
    OptedOut {
        setting: String,
    },
}

impl PreferenceDecision {
    pub fn is_allowed(&self) -> bool {
        matches!(self, PreferenceDecision::Allowed)
    }
}

/// Evaluates `sets` for `query`.
///
/// `sets` are in precedence order, highest first (Knock with a tenant: the
/// user's tenant-specific set, then the tenant's defaults, then the user's
/// default set). Checks the workflow, then the categories in the order given,
/// then the channel type, and reports the first opt-out.
pub fn evaluate(sets: &[&PreferenceSet], query: &PreferenceQuery) -> PreferenceDecision {
    let channel_type = query.channel_type;

    let workflow = sets.iter().find_map(|set| set.workflows.get(query.workflow_key));
    if let Some(setting) = workflow {
        if let Some(suffix) = opt_out(setting, channel_type) {
            return PreferenceDecision::OptedOut { setting: format!("workflows.{}{suffix}", query.workflow_key) };
        }
    }

    for category in query.categories {
        let resolved = sets.iter().find_map(|set| set.categories.get(category));
        if let Some(setting) = resolved {
            if let Some(suffix) = opt_out(setting, channel_type) {
                return PreferenceDecision::OptedOut { setting: format!("categories.{category}{suffix}") };
            }
        }
    }

    let channel = sets.iter().find_map(|set| set.channel_types.get(channel_type));
    if channel == Some(&false) {
        return PreferenceDecision::OptedOut { setting: format!("channel_types.{channel_type}") };
    }

    PreferenceDecision::Allowed
}

/// `None` when `setting` allows `channel_type`; otherwise the suffix naming the
/// deciding part of the entry ("" for a plain `false`).
fn opt_out(setting: &PreferenceSetting, channel_type: &str) -> Option<String> {
    match setting {
        PreferenceSetting::Enabled(true) => None,
        PreferenceSetting::Enabled(false) => Some(String::new()),
        // A channel type the entry does not mention is allowed.
        PreferenceSetting::PerChannelType { channel_types } => match channel_types.get(channel_type) {
            Some(false) => Some(format!(".channel_types.{channel_type}")),
            _ => None,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn set(v: serde_json::Value) -> PreferenceSet {
        serde_json::from_value(v).expect("test preference set parses")
    }

    fn query<'a>(workflow_key: &'a str, categories: &'a [String], channel_type: &'a str) -> PreferenceQuery<'a> {
        PreferenceQuery { workflow_key, categories, channel_type }
    }

    fn opted_out(setting: &str) -> PreferenceDecision {
        PreferenceDecision::OptedOut { setting: setting.into() }
    }

    fn cats(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn unset_and_empty_allow() {
        let collab = cats(&["collaboration"]);
        assert_eq!(evaluate(&[], &query("new-comment", &collab, "email")), PreferenceDecision::Allowed);
        let empty = PreferenceSet::default();
        assert_eq!(evaluate(&[&empty], &query("new-comment", &collab, "email")), PreferenceDecision::Allowed);
        // Entries for other workflows, categories and channel types do not apply.
        let other = set(json!({
            "workflows": {"other": false},
            "categories": {"billing": false},
            "channel_types": {"sms": false}
        }));
        assert_eq!(evaluate(&[&other], &query("new-comment", &collab, "email")), PreferenceDecision::Allowed);
        assert!(evaluate(&[&other], &query("new-comment", &collab, "email")).is_allowed());
    }

    #[test]
    fn explicit_true_allows() {
        let s = set(json!({
            "workflows": {"new-comment": true},
            "categories": {"collaboration": true},
            "channel_types": {"email": true}
        }));
        let collab = cats(&["collaboration"]);
        assert_eq!(evaluate(&[&s], &query("new-comment", &collab, "email")), PreferenceDecision::Allowed);
    }

    #[test]
    fn each_kind_of_opt_out() {
        let collab = cats(&["collaboration"]);
        let q = query("new-comment", &collab, "email");

        let s = set(json!({"workflows": {"new-comment": false}}));
        assert_eq!(evaluate(&[&s], &q), opted_out("workflows.new-comment"));

        let s = set(json!({"workflows": {"new-comment": {"channel_types": {"email": false}}}}));
        assert_eq!(evaluate(&[&s], &q), opted_out("workflows.new-comment.channel_types.email"));

        let s = set(json!({"categories": {"collaboration": false}}));
        assert_eq!(evaluate(&[&s], &q), opted_out("categories.collaboration"));

        let s = set(json!({"categories": {"collaboration": {"channel_types": {"email": false}}}}));
        assert_eq!(evaluate(&[&s], &q), opted_out("categories.collaboration.channel_types.email"));

        let s = set(json!({"channel_types": {"email": false}}));
        assert_eq!(evaluate(&[&s], &q), opted_out("channel_types.email"));
    }

    #[test]
    fn per_channel_type_entries_only_affect_their_channel_type() {
        let s = set(json!({
            "workflows": {"new-comment": {"channel_types": {"sms": false, "email": true}}},
            "categories": {"collaboration": {"channel_types": {"chat": false}}}
        }));
        let collab = cats(&["collaboration"]);
        assert_eq!(evaluate(&[&s], &query("new-comment", &collab, "email")), PreferenceDecision::Allowed);
        // A channel type the entry does not mention is allowed.
        assert_eq!(evaluate(&[&s], &query("new-comment", &collab, "push")), PreferenceDecision::Allowed);
        assert_eq!(evaluate(&[&s], &query("new-comment", &collab, "sms")), opted_out("workflows.new-comment.channel_types.sms"));
        assert_eq!(evaluate(&[&s], &query("new-comment", &collab, "chat")), opted_out("categories.collaboration.channel_types.chat"));
        // An empty per-channel-type entry allows everything.
        let s = set(json!({"workflows": {"new-comment": {"channel_types": {}}}}));
        assert_eq!(evaluate(&[&s], &query("new-comment", &collab, "sms")), PreferenceDecision::Allowed);
    }

    #[test]
    fn every_applicable_setting_must_allow_and_order_decides_the_reported_entry() {
        let s = set(json!({
            "workflows": {"new-comment": false},
            "categories": {"a": false, "b": false},
            "channel_types": {"email": false}
        }));
        let ab = cats(&["a", "b"]);
        let ba = cats(&["b", "a"]);
        assert_eq!(evaluate(&[&s], &query("new-comment", &ab, "email")), opted_out("workflows.new-comment"));
        assert_eq!(evaluate(&[&s], &query("other", &ab, "email")), opted_out("categories.a"));
        assert_eq!(evaluate(&[&s], &query("other", &ba, "email")), opted_out("categories.b"));
        assert_eq!(evaluate(&[&s], &query("other", &[], "email")), opted_out("channel_types.email"));
        // A workflow `true` does not override a category or channel type `false`.
        let s = set(json!({"workflows": {"w": true}, "channel_types": {"email": false}}));
        assert_eq!(evaluate(&[&s], &query("w", &[], "email")), opted_out("channel_types.email"));
    }

    #[test]
    fn higher_precedence_sets_win_per_entry() {
        let collab = cats(&["collaboration"]);
        let q = query("new-comment", &collab, "email");

        // A tenant-specific `true` beats a default-set `false`.
        let tenant_specific = set(json!({"workflows": {"new-comment": true}, "channel_types": {"email": true}}));
        let user_default = set(json!({"workflows": {"new-comment": false}, "channel_types": {"email": false}}));
        assert_eq!(evaluate(&[&tenant_specific, &user_default], &q), PreferenceDecision::Allowed);
        // ... and the order matters.
        assert_eq!(evaluate(&[&user_default, &tenant_specific], &q), opted_out("workflows.new-comment"));

        // A tenant default beats the user default.
        let tenant_default = set(json!({"categories": {"collaboration": false}}));
        let user_default = set(json!({"categories": {"collaboration": true}}));
        assert_eq!(evaluate(&[&tenant_default, &user_default], &q), opted_out("categories.collaboration"));

        // Entries the higher set does not define fall through to lower sets.
        let tenant_specific = set(json!({"workflows": {"new-comment": true}}));
        let tenant_default = PreferenceSet::default();
        let user_default = set(json!({"channel_types": {"email": false}}));
        assert_eq!(evaluate(&[&tenant_specific, &tenant_default, &user_default], &q), opted_out("channel_types.email"));

        // The whole workflow entry comes from one set: a higher per-channel-type
        // entry that allows email replaces a lower plain `false`.
        let high = set(json!({"workflows": {"new-comment": {"channel_types": {"sms": false}}}}));
        let low = set(json!({"workflows": {"new-comment": false}}));
        assert_eq!(evaluate(&[&high, &low], &q), PreferenceDecision::Allowed);
    }
}

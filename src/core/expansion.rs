//! Recipient expansion: from a trigger's recipients and audiences to the
//! de-duplicated list of everyone the workflow runs for.
//!
//! Rules (Knock's): direct recipients come first, in order, then audience
//! members; an object is itself a recipient and fans out to its subscribers,
//! nested at most two levels (object → object → users); the actor is never
//! notified through an object's subscriptions (but is when listed directly);
//! a recipient reached several ways runs once, as first reached.
//!
//! The core reads users, objects and memberships through the [`Directory`]
//! trait: the controller answers from its watch-fed indexes (nothing copied
//! per run), tests and overlays from a [`MemoryDirectory`]. Memberships come
//! in [`Members`] chunks (an object's own list, then each MemberSlice), so
//! an audience of any size is read in place, a chunk at a time.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use super::model::{parse_recipient, IdentifierError, JsonObject, PreferenceSet, RecipientKey};

/// A user as the core sees it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct UserRecord {
    pub id: String,
    /// Every property templates see as `recipient.<key>` (name, email, ... and custom ones).
    pub properties: JsonObject,
    pub channel_data: JsonObject,
    pub preferences: BTreeMap<String, PreferenceSet>,
    pub tenant_preferences: BTreeMap<String, PreferenceSet>,
}

/// An object as the core sees it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ObjectRecord {
    pub collection: String,
    pub id: String,
    pub properties: JsonObject,
    pub channel_data: JsonObject,
    pub preferences: BTreeMap<String, PreferenceSet>,
    /// The subscribers listed in the object itself (MemberSlices hold the rest).
    pub subscribers: Arc<Members>,
}

/// One subscription of an object, or one audience member.
#[derive(Clone, Debug, PartialEq)]
pub struct SubscriberRecord {
    pub recipient: RecipientKey,
    pub properties: JsonObject,
}

/// A chunk of an object's subscribers or an audience's members: a list as
/// written (kept in its order), or a MemberSlice (sorted by recipient, one
/// entry each, so that lookups are binary searches).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Members {
    list: Vec<SubscriberRecord>,
    sorted: bool,
    /// Whether any member has properties: most chunks have none, and a run
    /// looking up each recipient's subscription skips them.
    with_properties: bool,
}

impl Members {
    /// A list in the order it was written.
    pub fn listed(list: Vec<SubscriberRecord>) -> Self {
        Members::new(list, false)
    }

    /// A list sorted by recipient; a recipient listed twice keeps its first entry.
    pub fn sorted(mut list: Vec<SubscriberRecord>) -> Self {
        list.sort_by(|a, b| a.recipient.cmp(&b.recipient));
        list.dedup_by(|later, first| later.recipient == first.recipient);
        list.shrink_to_fit();
        Members::new(list, true)
    }

    fn new(list: Vec<SubscriberRecord>, sorted: bool) -> Self {
        let with_properties = list.iter().any(|s| !s.properties.is_empty());
        Members { list, sorted, with_properties }
    }

    pub fn iter(&self) -> impl Iterator<Item = &SubscriberRecord> {
        self.list.iter()
    }

    pub fn len(&self) -> usize {
        self.list.len()
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// The entry for `key`, if it is a member.
    pub fn get(&self, key: &RecipientKey) -> Option<&SubscriberRecord> {
        if self.sorted {
            self.list.binary_search_by(|s| s.recipient.cmp(key)).ok().map(|i| &self.list[i])
        } else {
            self.list.iter().find(|s| &s.recipient == key)
        }
    }

    pub fn contains(&self, key: &RecipientKey) -> bool {
        self.get(key).is_some()
    }

    /// The properties `key` has here, when it is a member with some.
    pub fn properties_of(&self, key: &RecipientKey) -> Option<&JsonObject> {
        if !self.with_properties {
            return None;
        }
        self.get(key).map(|s| &s.properties).filter(|p| !p.is_empty())
    }
}

/// Where the core looks up users, objects and memberships of one namespace.
pub trait Directory: Sync {
    fn user(&self, id: &str) -> Option<Arc<UserRecord>>;
    fn object(&self, collection: &str, id: &str) -> Option<Arc<ObjectRecord>>;
    /// An object's subscribers: its own list first, then its MemberSlices in name order.
    fn subscribers(&self, collection: &str, id: &str) -> Vec<Arc<Members>>;
    /// An audience's members in chunks, or None when there is no such audience.
    fn audience(&self, key: &str) -> Option<Vec<Arc<Members>>>;

    /// Whether audience `key` exists (without reading its members).
    fn has_audience(&self, key: &str) -> bool {
        self.audience(key).is_some()
    }

    /// True when the recipient exists.
    fn contains(&self, key: &RecipientKey) -> bool {
        match key {
            RecipientKey::User(id) => self.user(id).is_some(),
            RecipientKey::Object { collection, id } => self.object(collection, id).is_some(),
        }
    }

    /// Whether user `id` is a member of audience `key`.
    fn is_audience_member(&self, key: &str, id: &str) -> bool {
        let user = RecipientKey::user(id);
        self.audience(key).is_some_and(|chunks| chunks.iter().any(|c| c.contains(&user)))
    }
}

/// A directory held in memory: unit tests, and what a run identified
/// before the watch caches have it.
#[derive(Clone, Debug, Default)]
pub struct MemoryDirectory {
    users: HashMap<String, Arc<UserRecord>>,
    objects: HashMap<(String, String), Arc<ObjectRecord>>,
    audiences: HashMap<String, Arc<Members>>,
}

impl MemoryDirectory {
    pub fn insert_user(&mut self, user: UserRecord) {
        self.users.insert(user.id.clone(), Arc::new(user));
    }
    pub fn insert_object(&mut self, object: ObjectRecord) {
        self.objects.insert((object.collection.clone(), object.id.clone()), Arc::new(object));
    }
    pub fn insert_audience(&mut self, key: String, members: Vec<RecipientKey>) {
        let list = members.into_iter().map(|recipient| SubscriberRecord { recipient, properties: JsonObject::new() }).collect();
        self.audiences.insert(key, Arc::new(Members::listed(list)));
    }
    pub fn has_user(&self, id: &str) -> bool {
        self.users.contains_key(id)
    }
    pub fn has_object(&self, collection: &str, id: &str) -> bool {
        self.objects.contains_key(&(collection.to_string(), id.to_string()))
    }
    pub fn is_empty(&self) -> bool {
        self.users.is_empty() && self.objects.is_empty() && self.audiences.is_empty()
    }
}

impl Directory for MemoryDirectory {
    fn user(&self, id: &str) -> Option<Arc<UserRecord>> {
        self.users.get(id).cloned()
    }
    fn object(&self, collection: &str, id: &str) -> Option<Arc<ObjectRecord>> {
        self.objects.get(&(collection.to_string(), id.to_string())).cloned()
    }
    fn subscribers(&self, collection: &str, id: &str) -> Vec<Arc<Members>> {
        self.object(collection, id).map(|o| vec![o.subscribers.clone()]).unwrap_or_default()
    }
    fn audience(&self, key: &str) -> Option<Vec<Arc<Members>>> {
        self.audiences.get(key).map(|m| vec![m.clone()])
    }
}

/// `is_audience_member` in conditions, for any directory.
pub struct AudienceView<'a>(pub &'a dyn Directory);

impl crate::core::conditions::AudienceMembers for AudienceView<'_> {
    fn is_member(&self, audience: &str, id: &str) -> bool {
        self.0.is_audience_member(audience, id)
    }
}

/// A label selector as the core sees it (Kubernetes' `LabelSelector`):
/// every `match_labels` pair and every expression must hold; an empty
/// selector matches everything.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Selector {
    pub match_labels: std::collections::BTreeMap<String, String>,
    /// (key, operator: In, NotIn, Exists, DoesNotExist, values)
    pub match_expressions: Vec<(String, String, Vec<String>)>,
}

impl Selector {
    /// Whether `labels` match. An unknown operator matches nothing, so a
    /// typo never widens an audience to everyone.
    pub fn matches(&self, labels: &std::collections::BTreeMap<String, String>) -> bool {
        self.match_labels.iter().all(|(k, v)| labels.get(k) == Some(v))
            && self.match_expressions.iter().all(|(key, op, values)| match op.as_str() {
                "In" => labels.get(key).is_some_and(|v| values.contains(v)),
                "NotIn" => labels.get(key).is_none_or(|v| !values.contains(v)),
                "Exists" => labels.contains_key(key),
                "DoesNotExist" => !labels.contains_key(key),
                _ => false,
            })
    }
}

/// Parses an audience's members or an object's subscriber reference list.
pub fn parse_reference(value: &serde_json::Value) -> Result<RecipientKey, IdentifierError> {
    parse_recipient(value).map(|input| input.key().clone())
}

/// How a recipient was reached.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Via {
    Direct,
    Object { collection: String, id: String },
    Audience(String),
}

impl Via {
    /// The form shown in status: `direct`, `object:<collection>/<id>`, `audience:<key>`.
    pub fn label(&self) -> String {
        match self {
            Via::Direct => "direct".into(),
            Via::Object { collection, id } => format!("object:{collection}/{id}"),
            Via::Audience(key) => format!("audience:{key}"),
        }
    }

    /// Parses [`Via::label`]'s form back.
    pub fn parse(label: &str) -> Option<Via> {
        if label == "direct" {
            return Some(Via::Direct);
        }
        if let Some(rest) = label.strip_prefix("object:") {
            let (collection, id) = rest.split_once('/')?;
            return Some(Via::Object { collection: collection.into(), id: id.into() });
        }
        label.strip_prefix("audience:").map(|k| Via::Audience(k.into()))
    }
}

/// One recipient the workflow runs for.
#[derive(Clone, Debug, PartialEq)]
pub struct Reached {
    pub key: RecipientKey,
    pub via: Via,
    /// False when no such user or object exists (the recipient fails with RecipientNotFound).
    pub found: bool,
}

/// The outcome of expansion, whole (the tests' view; runs stream it).
#[cfg(test)]
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Expansion {
    pub recipients: Vec<Reached>,
    /// Audience keys that do not exist.
    pub missing_audiences: Vec<String>,
}

/// Object nesting limit: object → object → users.
const MAX_DEPTH: usize = 2;

/// Expands direct recipients and audiences (see the module docs) into one
/// list: [`Expander`] collected, which the tests compare against.
#[cfg(test)]
pub fn expand(direct: &[RecipientKey], audiences: &[String], actor: Option<&RecipientKey>, directory: &dyn Directory) -> Expansion {
    let mut expander = Expander::new(direct.to_vec(), audiences.to_vec(), actor.cloned(), directory);
    let recipients = expander.by_ref().collect();
    Expansion { recipients, missing_audiences: expander.missing_audiences }
}

/// Expansion one recipient at a time, in [`expand`]'s order: a run's first
/// page is cut (and delivering) before its millionth recipient is looked at.
/// Memberships are read a chunk at a time, in place; what grows with the
/// audience is only the set of recipients reached, kept as 128-bit hashes
/// (16 bytes each, not the keys).
pub struct Expander<'a> {
    directory: &'a dyn Directory,
    direct: std::vec::IntoIter<RecipientKey>,
    audiences: std::vec::IntoIter<String>,
    actor: Option<RecipientKey>,
    /// Memberships being walked, innermost last (at most [`MAX_DEPTH`] + 1).
    stack: Vec<Frame>,
    seen: HashSet<u128>,
    /// Audience keys that did not exist, as they were reached.
    pub missing_audiences: Vec<String>,
}

/// One membership being walked: an object's subscribers or an audience's members.
struct Frame {
    chunks: Vec<Arc<Members>>,
    chunk: usize,
    member: usize,
    via: Via,
    /// The depth its members are reached at.
    depth: usize,
    /// An object's subscriptions never reach the actor; an audience's do.
    of_object: bool,
}

impl<'a> Expander<'a> {
    pub fn new(direct: Vec<RecipientKey>, audiences: Vec<String>, actor: Option<RecipientKey>, directory: &'a dyn Directory) -> Self {
        Expander { directory, direct: direct.into_iter(), audiences: audiences.into_iter(), actor, stack: Vec::new(), seen: HashSet::new(), missing_audiences: Vec::new() }
    }

    /// Marks recipients as reached already (a resumed run's recipients on
    /// its existing pages): they are skipped, everyone else comes as before.
    /// Objects among them still fan out to their subscribers.
    pub fn already_reached(&mut self, reached: ReachedSet) {
        if self.seen.is_empty() {
            self.seen = reached.0;
        } else {
            self.seen.extend(reached.0);
        }
    }

    /// Reaches `key`: it is returned if new; an object below the nesting
    /// limit also opens its subscribers, which come next (depth first).
    fn reach(&mut self, key: RecipientKey, via: Via, depth: usize) -> Option<Reached> {
        let new = self.seen.insert(key_hash(&key));
        let found = self.directory.contains(&key);
        // Fan out even when the object was already reached directly: the
        // subscribers are de-duplicated by `seen` and the depth bounds cycles.
        if let (RecipientKey::Object { collection, id }, true) = (&key, found && depth < MAX_DEPTH) {
            let chunks = self.directory.subscribers(collection, id);
            let via = Via::Object { collection: collection.clone(), id: id.clone() };
            self.stack.push(Frame { chunks, chunk: 0, member: 0, via, depth: depth + 1, of_object: true });
        }
        new.then_some(Reached { key, via, found })
    }
}

impl Iterator for Expander<'_> {
    type Item = Reached;

    fn next(&mut self) -> Option<Reached> {
        loop {
            if let Some(frame) = self.stack.last_mut() {
                let Some(chunk) = frame.chunks.get(frame.chunk) else {
                    self.stack.pop();
                    continue;
                };
                let Some(member) = chunk.list.get(frame.member) else {
                    frame.chunk += 1;
                    frame.member = 0;
                    continue;
                };
                frame.member += 1;
                if frame.of_object && Some(&member.recipient) == self.actor.as_ref() {
                    continue;
                }
                if frame.of_object && member.recipient.is_object() && frame.depth >= MAX_DEPTH {
                    continue;
                }
                let (key, via, depth) = (member.recipient.clone(), frame.via.clone(), frame.depth);
                if let Some(reached) = self.reach(key, via, depth) {
                    return Some(reached);
                }
            } else if let Some(key) = self.direct.next() {
                if let Some(reached) = self.reach(key, Via::Direct, 0) {
                    return Some(reached);
                }
            } else {
                let audience = self.audiences.next()?;
                match self.directory.audience(&audience) {
                    Some(chunks) => self.stack.push(Frame { chunks, chunk: 0, member: 0, via: Via::Audience(audience), depth: 0, of_object: false }),
                    None => self.missing_audiences.push(audience),
                }
            }
        }
    }
}

/// Recipients reached already, as an expansion remembers them (16 bytes
/// each): what a resumed run gathers from its pages as it reads them, so that
/// it need not hold their records to skip their recipients.
#[derive(Debug, Default)]
pub struct ReachedSet(HashSet<u128>);

impl<K: std::borrow::Borrow<RecipientKey>> Extend<K> for ReachedSet {
    fn extend<I: IntoIterator<Item = K>>(&mut self, keys: I) {
        self.0.extend(keys.into_iter().map(|k| key_hash(k.borrow())));
    }
}

impl<K: std::borrow::Borrow<RecipientKey>> FromIterator<K> for ReachedSet {
    fn from_iter<I: IntoIterator<Item = K>>(keys: I) -> Self {
        let mut set = ReachedSet::default();
        set.extend(keys);
        set
    }
}

/// A recipient's 128-bit hash (two SipHashes of the key): 1,000,000
/// recipients collide with odds of about 1 in 10^27.
fn key_hash(key: &RecipientKey) -> u128 {
    use std::hash::{Hash, Hasher};
    let half = |salt: u8| {
        let mut h = std::hash::DefaultHasher::new();
        salt.hash(&mut h);
        key.hash(&mut h);
        h.finish()
    };
    (u128::from(half(0)) << 64) | u128::from(half(1))
}

/// Properties of the subscription through which `key` was reached (None
/// when it was not reached through an object). Only chunks where someone
/// has properties are searched: at 250,000 subscribers that is most often
/// none of 250 slices.
pub fn subscription(directory: &dyn Directory, via: &Via, key: &RecipientKey) -> Option<JsonObject> {
    let Via::Object { collection, id } = via else { return None };
    Some(directory.subscribers(collection, id).iter().find_map(|c| c.properties_of(key).cloned()).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn user(id: &str) -> UserRecord {
        UserRecord { id: id.into(), ..Default::default() }
    }

    fn object(collection: &str, id: &str, subs: &[RecipientKey]) -> ObjectRecord {
        ObjectRecord {
            collection: collection.into(),
            id: id.into(),
            subscribers: Arc::new(Members::listed(subs.iter().map(|k| SubscriberRecord { recipient: k.clone(), properties: JsonObject::new() }).collect())),
            ..Default::default()
        }
    }

    fn keys(e: &Expansion) -> Vec<String> {
        e.recipients.iter().map(|r| r.key.to_string()).collect()
    }

    fn u(id: &str) -> RecipientKey {
        RecipientKey::user(id)
    }

    fn directory() -> MemoryDirectory {
        let mut d = MemoryDirectory::default();
        for id in ["u1", "u2", "u3", "u4", "actor"] {
            d.insert_user(user(id));
        }
        d.insert_object(object("teams", "ops", &[u("u3"), u("u1"), RecipientKey::object("teams", "deep")]));
        d.insert_object(object("teams", "deep", &[u("u4")]));
        d.insert_object(object("projects", "p1", &[u("u1"), u("actor"), RecipientKey::object("teams", "ops"), u("u2")]));
        d
    }

    #[test]
    fn fans_out_two_levels_deduplicates_and_excludes_the_actor() {
        let d = directory();
        let e = expand(&[u("u2"), RecipientKey::object("projects", "p1")], &[], Some(&u("actor")), &d);
        // u2 direct first; p1; its subscribers u1, teams/ops (level 1) and ops' users (level 2);
        // teams/deep is an object at level 2 and is not reached; the actor is excluded.
        assert_eq!(keys(&e), ["u2", "projects/p1", "u1", "teams/ops", "u3"]);
        assert_eq!(e.recipients[0].via, Via::Direct);
        assert_eq!(e.recipients[2].via, Via::Object { collection: "projects".into(), id: "p1".into() });
        assert_eq!(e.recipients[4].via.label(), "object:teams/ops");
        assert!(e.recipients.iter().all(|r| r.found));
    }

    #[test]
    fn the_actor_is_notified_when_listed_directly() {
        let d = directory();
        let e = expand(&[u("actor"), RecipientKey::object("projects", "p1")], &[], Some(&u("actor")), &d);
        assert_eq!(e.recipients.iter().filter(|r| r.key == u("actor")).count(), 1);
    }

    #[test]
    fn unknown_recipients_are_reached_but_not_found() {
        let d = directory();
        let e = expand(&[u("nobody"), RecipientKey::object("projects", "nope")], &[], None, &d);
        assert_eq!(keys(&e), ["nobody", "projects/nope"]);
        assert!(e.recipients.iter().all(|r| !r.found));
    }

    #[test]
    fn audiences_fan_out_after_direct_recipients() {
        let mut d = directory();
        d.insert_audience("followers".into(), vec![u("u1"), u("u4"), RecipientKey::object("teams", "deep")]);
        let e = expand(&[u("u1")], &["followers".into(), "missing".into()], None, &d);
        assert_eq!(keys(&e), ["u1", "u4", "teams/deep"]);
        assert_eq!(e.recipients[1].via, Via::Audience("followers".into()));
        assert_eq!(e.missing_audiences, ["missing"]);
    }

    #[test]
    fn cycles_terminate() {
        let mut d = MemoryDirectory::default();
        d.insert_user(user("u1"));
        d.insert_object(object("a", "1", &[RecipientKey::object("b", "1")]));
        d.insert_object(object("b", "1", &[RecipientKey::object("a", "1"), u("u1")]));
        let e = expand(&[RecipientKey::object("a", "1")], &[], None, &d);
        assert_eq!(keys(&e), ["a/1", "b/1", "u1"]);
    }

    #[test]
    fn ten_thousand_subscribers_expand_once_each() {
        let mut d = MemoryDirectory::default();
        let subs: Vec<RecipientKey> = (0..10_000).map(|i| u(&format!("user_{i}"))).collect();
        for s in &subs {
            d.insert_user(user(s.id()));
        }
        // Every subscriber twice: once directly in the object, once through a nested one.
        d.insert_object(object("big", "nested", &subs));
        let mut top = subs.clone();
        top.push(RecipientKey::object("big", "nested"));
        d.insert_object(object("big", "top", &top));
        let e = expand(&[RecipientKey::object("big", "top")], &[], None, &d);
        assert_eq!(e.recipients.len(), 10_002);
    }

    /// A directory whose object and audience memberships come in slices, as the controller's does.
    struct Sliced {
        users: MemoryDirectory,
        slices: Vec<Arc<Members>>,
    }

    impl Directory for Sliced {
        fn user(&self, id: &str) -> Option<Arc<UserRecord>> {
            self.users.user(id)
        }
        fn object(&self, collection: &str, id: &str) -> Option<Arc<ObjectRecord>> {
            (collection == "big" && id == "o").then(|| Arc::new(object("big", "o", &[u("first")])))
        }
        fn subscribers(&self, collection: &str, id: &str) -> Vec<Arc<Members>> {
            let own = self.object(collection, id).map(|o| o.subscribers.clone());
            own.into_iter().chain(self.slices.iter().cloned()).collect()
        }
        fn audience(&self, key: &str) -> Option<Vec<Arc<Members>>> {
            (key == "big").then(|| self.slices.clone())
        }
    }

    #[test]
    fn slices_expand_in_order_once_each_and_answer_lookups() {
        let mut users = MemoryDirectory::default();
        let record = |id: String| SubscriberRecord { recipient: u(&id), properties: JsonObject::new() };
        users.insert_user(user("first"));
        for i in 0..3000 {
            users.insert_user(user(&format!("u{i:04}")));
        }
        // Three slices; "u0500" is in two of them (a writer race) and "first" is also inline.
        let slices = vec![
            Arc::new(Members::sorted((0..1000).rev().map(|i| record(format!("u{i:04}"))).chain([record("first".into())]).collect())),
            Arc::new(Members::sorted((1000..2000).map(|i| record(format!("u{i:04}"))).chain([record("u0500".into())]).collect())),
            Arc::new(Members::sorted((2000..3000).map(|i| record(format!("u{i:04}"))).collect())),
        ];
        let d = Sliced { users, slices };
        let e = expand(&[RecipientKey::object("big", "o")], &[], None, &d);
        assert_eq!(e.recipients.len(), 1 + 1 + 3000, "the object, `first` and each member once");
        assert_eq!(keys(&e)[..4], ["big/o", "first", "u0000", "u0001"], "each slice is read in recipient order");
        let e = expand(&[], &["big".into()], None, &d);
        assert_eq!(e.recipients.len(), 3001);
        assert!(d.is_audience_member("big", "u2999") && d.is_audience_member("big", "u0000"));
        assert!(!d.is_audience_member("big", "u3000") && !d.is_audience_member("other", "u0000"));
    }

    /// A directory that counts the lookups expansion makes.
    struct Counting<'a>(&'a dyn Directory, std::sync::atomic::AtomicUsize);

    impl Directory for Counting<'_> {
        fn user(&self, id: &str) -> Option<Arc<UserRecord>> {
            self.1.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            self.0.user(id)
        }
        fn object(&self, collection: &str, id: &str) -> Option<Arc<ObjectRecord>> {
            self.1.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            self.0.object(collection, id)
        }
        fn subscribers(&self, collection: &str, id: &str) -> Vec<Arc<Members>> {
            self.0.subscribers(collection, id)
        }
        fn audience(&self, key: &str) -> Option<Vec<Arc<Members>>> {
            self.0.audience(key)
        }
    }

    fn big_audience(ids: impl Iterator<Item = usize>) -> MemoryDirectory {
        let mut d = MemoryDirectory::default();
        let members: Vec<RecipientKey> = ids.map(|i| u(&format!("m{i:06}"))).collect();
        for m in &members {
            d.insert_user(user(m.id()));
        }
        d.insert_audience("all".into(), members);
        d
    }

    #[test]
    fn the_first_recipients_come_without_reading_the_rest() {
        let d = big_audience(0..100_000);
        let counting = Counting(&d, Default::default());
        let first: Vec<Reached> = Expander::new(vec![], vec!["all".into()], None, &counting).take(500).collect();
        assert_eq!(first.len(), 500);
        assert_eq!(first[499].key, u("m000499"));
        let lookups = counting.1.load(std::sync::atomic::Ordering::Relaxed);
        assert!(lookups <= 501, "500 recipients took {lookups} lookups");
    }

    #[test]
    fn a_resumed_expansion_skips_what_was_reached_and_loses_nobody() {
        // The run reached the first 500 of 1,000 members; then m000010 left,
        // m001000 joined, and the operator restarted.
        let before = big_audience(0..1000);
        let reached: Vec<RecipientKey> = Expander::new(vec![], vec!["all".into()], None, &before).take(500).map(|r| r.key).collect();
        let after = big_audience((0..1001).filter(|i| *i != 10));
        let mut resumed = Expander::new(vec![], vec!["all".into()], None, &after);
        resumed.already_reached(reached.iter().collect());
        let rest: Vec<RecipientKey> = resumed.map(|r| r.key).collect();
        assert_eq!(rest.first(), Some(&u("m000500")), "nobody moved onto a page already written");
        assert_eq!(rest.len(), 501);
        let everyone: HashSet<&RecipientKey> = reached.iter().chain(&rest).collect();
        assert_eq!(everyone.len(), 1001, "each once: the 1,000 first members and the one who joined");
        assert!(everyone.contains(&u("m001000")));
    }

    #[test]
    fn streamed_and_whole_expansions_agree() {
        let mut d = directory();
        d.insert_audience("followers".into(), vec![u("u1"), u("u4"), RecipientKey::object("teams", "ops"), u("nobody")]);
        let direct = [u("u2"), RecipientKey::object("projects", "p1")];
        let whole = expand(&direct, &["followers".into(), "gone".into()], Some(&u("actor")), &d);
        let mut streamed = Expander::new(direct.to_vec(), vec!["followers".into(), "gone".into()], Some(u("actor")), &d);
        let one_by_one: Vec<Reached> = streamed.by_ref().collect();
        assert_eq!(one_by_one, whole.recipients);
        assert_eq!(streamed.missing_audiences, ["gone"]);
        assert_eq!(keys(&whole), ["u2", "projects/p1", "u1", "teams/ops", "u3", "u4", "teams/deep", "nobody"]);
    }

    #[test]
    fn via_labels_round_trip() {
        for via in [Via::Direct, Via::Object { collection: "c".into(), id: "a/b".into() }, Via::Audience("x.y".into())] {
            assert_eq!(Via::parse(&via.label()), Some(via));
        }
    }

    #[test]
    fn subscription_properties_are_found() {
        let mut d = MemoryDirectory::default();
        let mut o = object("projects", "p1", &[]);
        o.subscribers = Arc::new(Members::listed(vec![SubscriberRecord { recipient: u("u1"), properties: json!({"role": "owner"}).as_object().unwrap().clone() }]));
        d.insert_object(o);
        let via = Via::Object { collection: "projects".into(), id: "p1".into() };
        assert_eq!(subscription(&d, &via, &u("u1")).unwrap()["role"], "owner");
        assert!(subscription(&d, &Via::Direct, &u("u1")).is_none());
        // A subscriber without properties has an empty subscription (templates see `{}`).
        let mut plain_object = object("projects", "p2", &[u("u1")]);
        plain_object.subscribers = Arc::new(Members::sorted(vec![SubscriberRecord { recipient: u("u1"), properties: JsonObject::new() }]));
        d.insert_object(plain_object);
        let plain_via = Via::Object { collection: "projects".into(), id: "p2".into() };
        assert_eq!(subscription(&d, &plain_via, &u("u1")), Some(JsonObject::new()));
        // properties_of answers only members with properties (a chunk with none is not searched).
        let plain = Members::sorted(vec![SubscriberRecord { recipient: u("u2"), properties: JsonObject::new() }]);
        assert_eq!(plain.properties_of(&u("u2")), None);
        let with = Members::sorted(vec![
            SubscriberRecord { recipient: u("u2"), properties: JsonObject::new() },
            SubscriberRecord { recipient: u("u3"), properties: json!({"role": "viewer"}).as_object().unwrap().clone() },
        ]);
        assert_eq!(with.properties_of(&u("u3")).unwrap()["role"], "viewer");
        assert_eq!(with.properties_of(&u("u2")), None);
    }

    #[test]
    fn label_selectors() {
        use std::collections::BTreeMap;
        let labels: BTreeMap<String, String> = [("plan".to_string(), "pro".to_string()), ("region".to_string(), "eu".to_string())].into();
        let pro = Selector { match_labels: [("plan".to_string(), "pro".to_string())].into(), ..Default::default() };
        assert!(pro.matches(&labels));
        assert!(!pro.matches(&BTreeMap::new()));
        let expr = |key: &str, op: &str, values: &[&str]| Selector {
            match_expressions: vec![(key.into(), op.into(), values.iter().map(|v| v.to_string()).collect())],
            ..Default::default()
        };
        assert!(expr("region", "In", &["eu", "us"]).matches(&labels));
        assert!(!expr("region", "NotIn", &["eu"]).matches(&labels));
        assert!(expr("tier", "NotIn", &["gold"]).matches(&labels));
        assert!(expr("plan", "Exists", &[]).matches(&labels));
        assert!(expr("tier", "DoesNotExist", &[]).matches(&labels));
        assert!(!expr("plan", "Typo", &[]).matches(&labels), "an unknown operator matches nothing");
        assert!(Selector::default().matches(&labels));
    }
}

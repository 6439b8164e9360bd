//! The in-app feed in the store: a user's messages of one `in_app_feed`
//! channel, their counts, and engagement (seen, read, archived, interacted).
//!
//! A new feed message is announced with `pg_notify` on [`CHANNEL`] (payload
//! `{"namespace","channel","user"}`), so every replica learns of it,
//! whichever stored it.

use jiff::Timestamp;
use serde_json::{json, Value};
use tokio_postgres::types::ToSql;
use uuid::Uuid;

use super::messages::{page, read_row, MessagePage, Query, Start, SELECT_COLUMNS};
use super::{Store, StoreError};
use crate::core::history::{EngagementAction, MessageRecord};

/// The PostgreSQL notification channel of new feed messages.
pub const CHANNEL: &str = "herald_feed";
/// The channel type of feed messages.
pub const CHANNEL_TYPE: &str = "in_app_feed";

/// Which engagement a feed lists (`status=`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ReadStatus {
    #[default]
    All,
    Unread,
    Read,
    Unseen,
    Seen,
}

/// Whether a feed lists archived messages (`archived=`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Archived {
    #[default]
    Exclude,
    Include,
    Only,
}

/// A user's feed of one channel, filtered.
#[derive(Clone, Debug, Default)]
pub struct FeedFilter {
    pub namespace: String,
    pub channel: String,
    pub user: String,
    pub status: ReadStatus,
    pub archived: Archived,
    /// A workflow key.
    pub source: Option<String>,
    /// This tenant's messages, and (unless `has_tenant`) those without one.
    pub tenant: Option<String>,
    /// Only messages with a tenant (the one named, if any).
    pub has_tenant: bool,
    /// Any of these categories.
    pub categories: Vec<String>,
    /// Every pair must match the trigger's data (flat values).
    pub trigger_data: Vec<(String, Value)>,
    pub inserted_after: Option<Timestamp>,
    pub inserted_before: Option<Timestamp>,
}

/// The counts of a feed (every filter but `status`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FeedCounts {
    pub total: i64,
    pub unread: i64,
    pub unseen: i64,
}

/// The feed's conditions.
struct FeedQuery;

impl FeedQuery {
    /// The feed's conditions; `with_status`: the read-status filter too (not for counts).
    fn of(filter: &FeedFilter, with_status: bool) -> Query {
        let mut q = Query::default();
        let ns = q.bind(Box::new(filter.namespace.clone()));
        let channel = q.bind(Box::new(filter.channel.clone()));
        let user = q.bind(Box::new(filter.user.clone()));
        q.wheres.push(format!("namespace = {ns} AND channel = {channel} AND recipient_id = {user} AND recipient_collection = '' AND channel_type = '{CHANNEL_TYPE}'"));
        q.wheres.push(
            match filter.archived {
                Archived::Exclude => "archived_at IS NULL",
                Archived::Include => "TRUE",
                Archived::Only => "archived_at IS NOT NULL",
            }
            .to_string(),
        );
        if with_status {
            let status = match filter.status {
                ReadStatus::All => None,
                ReadStatus::Unread => Some("read_at IS NULL"),
                ReadStatus::Read => Some("read_at IS NOT NULL"),
                ReadStatus::Unseen => Some("seen_at IS NULL"),
                ReadStatus::Seen => Some("seen_at IS NOT NULL"),
            };
            q.wheres.extend(status.map(str::to_string));
        }
        q.eq("workflow", filter.source.clone().map(|v| Box::new(v) as _));
        match (&filter.tenant, filter.has_tenant) {
            (Some(t), false) => {
                let p = q.bind(Box::new(t.clone()));
                q.wheres.push(format!("(tenant = {p} OR tenant IS NULL)"));
            }
            (Some(t), true) => {
                let p = q.bind(Box::new(t.clone()));
                q.wheres.push(format!("tenant = {p}"));
            }
            (None, true) => q.wheres.push("tenant IS NOT NULL".into()),
            (None, false) => {}
        }
        if !filter.categories.is_empty() {
            let p = q.bind(Box::new(filter.categories.clone()));
            q.wheres.push(format!("categories && {p}"));
        }
        if !filter.trigger_data.is_empty() {
            let object: serde_json::Map<String, Value> = filter.trigger_data.iter().cloned().collect();
            let p = q.bind(Box::new(Value::Object(object)));
            q.wheres.push(format!("data @> {p}"));
        }
        q.inserted_between(filter.inserted_after, filter.inserted_before);
        q
    }
}

/// Lists a feed, newest first, `size` at a time.
pub async fn list(store: &Store, filter: &FeedFilter, start: Start, size: usize) -> Result<MessagePage, StoreError> {
    page(store, FeedQuery::of(filter, true), start, size).await
}

/// The counts of a feed under its filters (but `status`).
pub async fn counts(store: &Store, filter: &FeedFilter) -> Result<FeedCounts, StoreError> {
    let q = FeedQuery::of(filter, false);
    let sql = format!("SELECT count(*), count(*) FILTER (WHERE read_at IS NULL), count(*) FILTER (WHERE seen_at IS NULL) FROM herald_messages WHERE {}", q.wheres.join(" AND "));
    let row = store.client().await?.query_one(sql.as_str(), &q.refs()).await?;
    Ok(FeedCounts { total: row.try_get(0)?, unread: row.try_get(1)?, unseen: row.try_get(2)? })
}

/// Sets or clears one engagement status of these messages (of `owner` only,
/// when given: a user token acts on its own messages). Returns the messages
/// as they are now; ids that are not there (or not the owner's) are left out.
pub async fn engage(store: &Store, namespace: &str, ids: &[Uuid], owner: Option<&str>, action: EngagementAction) -> Result<Vec<MessageRecord>, StoreError> {
    let (column, set) = action.column();
    let value = if set { "$3" } else { "NULL" };
    // A click is a read, as Knock's client takes it (it marks the item read and seen).
    let also = if action == EngagementAction::Interacted { ", seen_at = COALESCE(seen_at, $3), read_at = COALESCE(read_at, $3)" } else { "" };
    let owner_clause = if owner.is_some() { " AND recipient_id = $4 AND recipient_collection = ''" } else { "" };
    let sql = format!("UPDATE herald_messages SET {column} = {value}{also}, updated_at = $3 WHERE namespace = $1 AND id = ANY($2){owner_clause} RETURNING {SELECT_COLUMNS}");
    let now = Timestamp::now();
    let ids = ids.to_vec();
    let mut params: Vec<&(dyn ToSql + Sync)> = vec![&namespace, &ids, &now];
    if let Some(owner) = &owner {
        params.push(owner);
    }
    let rows = store.client().await?.query(sql.as_str(), &params).await?;
    rows.iter().map(read_row).collect()
}

/// Sets or clears one engagement status of every message in these users'
/// feeds of a channel that `filter` matches (its `user` is replaced by each
/// of `users`); the number of messages changed.
pub async fn engage_all(store: &Store, filter: &FeedFilter, users: &[String], action: EngagementAction) -> Result<u64, StoreError> {
    let (column, set) = action.column();
    let mut changed = 0;
    for user in users {
        let mut q = FeedQuery::of(&FeedFilter { user: user.clone(), ..filter.clone() }, true);
        let now = q.bind(Box::new(Timestamp::now()));
        let value = if set { now.clone() } else { "NULL".to_string() };
        let sql = format!("UPDATE herald_messages SET {column} = {value}, updated_at = {now} WHERE {}", q.wheres.join(" AND "));
        changed += store.client().await?.execute(sql.as_str(), &q.refs()).await?;
    }
    Ok(changed)
}

/// Announces a new feed message to every replica.
pub async fn notify(store: &Store, namespace: &str, channel: &str, user: &str) -> Result<(), StoreError> {
    let payload = json!({"namespace": namespace, "channel": channel, "user": user}).to_string();
    store.client().await?.execute("SELECT pg_notify($1, $2)", &[&CHANNEL, &payload]).await?;
    Ok(())
}

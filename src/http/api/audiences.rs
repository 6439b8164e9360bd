//! Audience members: `POST/DELETE/GET /v1/audiences/{key}/members`, Knock's
//! Audiences API. Members live in the audience's MemberSlices (no size
//! limit); an Audience resource with that key is not needed (members added
//! through the API make the audience), and one that exists adds its own
//! listed members and selector.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde_json::{json, Value};

use super::auth::Caller;
use super::errors::ApiError;
use super::objects::{page, PageQuery};
use super::{check_id, check_ids, Api, Fields, JsonBody, Params, QueryParams};
use crate::controller::directory::{self, LiveDirectory};
use crate::controller::identify::{self, Overwrite};
use crate::controller::membership::Change;
use crate::core::expansion::Directory;
use crate::core::model::{parse_recipient, JsonObject, RecipientInput, RecipientKey};
use crate::resources::MemberTarget;

/// Members per call at most (Knock's limit).
const MAX_MEMBERS_PER_CALL: usize = 1000;

/// One member of a request: the user (inline properties identify it) and its tenant.
struct Member {
    user: RecipientInput,
    tenant: Option<String>,
}

/// Reads `members`: `[{user: {id, ...}, tenant?}]`.
fn read_members(f: &mut Fields) -> Vec<Member> {
    let values = match f.array("members") {
        Some(v) if !v.is_empty() && v.len() <= MAX_MEMBERS_PER_CALL => v,
        Some(v) if v.is_empty() => {
            f.error("/members", "must list at least one member");
            return Vec::new();
        }
        Some(_) => {
            f.error("/members", format!("at most {MAX_MEMBERS_PER_CALL} members per call"));
            return Vec::new();
        }
        None => {
            if !f.has_errors() {
                f.error("/members", "is required");
            }
            return Vec::new();
        }
    };
    let mut out = Vec::new();
    for (i, value) in values.iter().enumerate() {
        let at = format!("/members/{i}");
        let Some(entry) = value.as_object() else {
            f.error(at, "must be an object {user: {id}, tenant?}");
            continue;
        };
        if let Some(unknown) = entry.keys().find(|k| !matches!(k.as_str(), "user" | "tenant")) {
            f.error(format!("{at}/{unknown}"), "is not a field of a member (user, tenant)");
            continue;
        }
        let tenant = match entry.get("tenant") {
            None | Some(Value::Null) => None,
            Some(Value::String(t)) => match check_id(&format!("{at}/tenant"), t) {
                Ok(()) => Some(t.clone()),
                Err(e) => {
                    f.push(e);
                    continue;
                }
            },
            Some(_) => {
                f.error(format!("{at}/tenant"), "must be a tenant id string");
                continue;
            }
        };
        match entry.get("user").map(parse_recipient) {
            Some(Ok(user)) if !user.key().is_object() => match check_id(&format!("{at}/user/id"), user.key().id()) {
                Ok(()) => out.push(Member { user, tenant }),
                Err(e) => f.push(e),
            },
            Some(Ok(_)) => f.error(format!("{at}/user"), "must be a user ({id, ...}), not an object"),
            Some(Err(e)) => f.error(format!("{at}/user"), e.to_string()),
            None => f.error(format!("{at}/user"), "is required"),
        }
    }
    out
}

fn properties_of(member: &Member) -> JsonObject {
    let mut properties = JsonObject::new();
    if let Some(tenant) = &member.tenant {
        properties.insert("tenant".into(), json!(tenant));
    }
    properties
}

/// `POST /v1/audiences/{key}/members` → 204: adds members (users given
/// with properties are identified first).
pub async fn add(State(api): State<Arc<Api>>, caller: Caller, Params(key): Params<String>, JsonBody(body): JsonBody) -> Result<StatusCode, ApiError> {
    api.allow(&caller, "update", "memberslices").await?;
    check_ids(&[("key", &key)])?;
    let mut f = Fields::new(body)?;
    let members = read_members(&mut f);
    // Knock's create_audience query flag is not needed: members make the audience.
    f.deny_unknown(" (adding members takes members)");
    f.finish()?;
    api.caches_ready().await?;
    for member in &members {
        if let RecipientInput::Inline(inline) = &member.user {
            if identify::identify_recipient(&api.ctx.client, &api.ctx.stores, &caller.namespace, inline, Overwrite::Allowed).await?.written().wrote() {
                api.ctx.metrics.write("User");
            }
        }
    }
    let added = members.iter().map(|m| (m.user.key().clone(), properties_of(m))).collect();
    api.membership.apply(&caller.namespace, &MemberTarget::Audience(key), Change::Add(added)).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `DELETE /v1/audiences/{key}/members` → 204: removes members (from the
/// audience's MemberSlices; members listed in an Audience resource are
/// changed there, with kubectl).
pub async fn remove(State(api): State<Arc<Api>>, caller: Caller, Params(key): Params<String>, JsonBody(body): JsonBody) -> Result<StatusCode, ApiError> {
    api.allow(&caller, "update", "memberslices").await?;
    check_ids(&[("key", &key)])?;
    let mut f = Fields::new(body)?;
    let members = read_members(&mut f);
    f.deny_unknown(" (removing members takes members)");
    f.finish()?;
    api.caches_ready().await?;
    let keys: Vec<RecipientKey> = members.iter().map(|m| m.user.key().clone()).collect();
    api.membership.apply(&caller.namespace, &MemberTarget::Audience(key), Change::Remove(keys)).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /v1/audiences/{key}/members`: the members, in pages (`page_size` up
/// to 50, `after`), as Knock's `AudienceMember`s.
pub async fn list(State(api): State<Arc<Api>>, caller: Caller, Params(key): Params<String>, QueryParams(query): QueryParams<PageQuery>) -> Result<Json<Value>, ApiError> {
    api.allow(&caller, "get", "memberslices").await?;
    check_ids(&[("key", &key)])?;
    api.caches_ready().await?;
    let directory = LiveDirectory::new(&api.ctx.stores, &caller.namespace);
    let chunks = directory.audience(&key).ok_or_else(|| ApiError::not_found("resource_missing", format!("audience `{key}` not found")))?;
    let (entries, page_info) = page(chunks.iter().flat_map(|c| c.iter()), &query)?;
    let entries: Vec<Value> = entries
        .iter()
        .map(|m| {
            let id = m.recipient.id();
            let mut user = directory::user(&api.ctx.stores, &caller.namespace, id).map(|u| u.properties.clone()).unwrap_or_default();
            user.insert("__typename".into(), json!("User"));
            user.insert("id".into(), json!(id));
            // When a member joined is not kept (a slice stores members, not their history).
            json!({"__typename": "AudienceMember", "user_id": id, "user": user, "tenant": m.properties.get("tenant"), "added_at": null})
        })
        .collect();
    Ok(Json(json!({"entries": entries, "page_info": page_info})))
}

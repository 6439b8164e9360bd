//! The OpenAPI 3 document of the API, served at `/openapi.json`. Written by
//! hand next to the routes; a test checks it names exactly the routes served
//! (api::ROUTES).

use serde_json::{json, Map, Value};

fn schema_ref(name: &str) -> Value {
    json!({"$ref": format!("#/components/schemas/{name}")})
}

fn json_content(schema: Value) -> Value {
    json!({"application/json": {"schema": schema}})
}

fn error_response(description: &str) -> Value {
    json!({"description": description, "content": json_content(schema_ref("Error"))})
}

fn path_params(path: &str) -> Vec<Value> {
    path.split('/')
        .filter_map(|seg| seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
        .map(|name| json!({"name": name, "in": "path", "required": true, "schema": {"type": "string", "maxLength": 256}}))
        .collect()
}

struct Op {
    summary: &'static str,
    tag: &'static str,
    body: Option<&'static str>,
    ok: (u16, Option<Value>),
    errors: &'static [u16],
    extra_params: Vec<Value>,
}

fn operation(path: &str, op: Op) -> Value {
    let mut responses = Map::new();
    let (code, schema) = op.ok;
    responses.insert(
        code.to_string(),
        match schema {
            Some(schema) => json!({"description": "Success", "content": json_content(schema)}),
            None => json!({"description": "Success, no content"}),
        },
    );
    for code in [401u16, 403, 429, 503].iter().chain(op.errors) {
        let description = match code {
            400 => "Malformed JSON, invalid UTF-8 or nesting too deep",
            401 => "Missing or invalid API key or token (api_key_missing, authentication_required)",
            403 => "The key or token may not act here (forbidden)",
            404 => "Not found (workflow_missing, resource_missing)",
            409 => "Conflict (idempotency_key_used: the legacy idempotencyKey was used by an earlier successful call)",
            413 => "The request body is larger than --max-body-bytes (payload_too_large)",
            422 => "Invalid parameters, every error listed (invalid_params, workflow_inactive, idempotency_key_mismatch)",
            429 => "Rate limited (rate_limit_exceeded); see Retry-After",
            503 => "The Kubernetes API cannot be reached; nothing was stored; see Retry-After",
            _ => "Error",
        };
        responses.insert(code.to_string(), error_response(description));
    }
    let mut params = path_params(path);
    params.extend(op.extra_params);
    params.push(json!({"name": "X-Herald-Namespace", "in": "header", "required": false, "schema": {"type": "string"},
        "description": "With a Kubernetes token: the namespace to act in. An API key acts in the namespace its Secret names (annotation herald.dev/namespace)."}));
    let mut out = json!({"summary": op.summary, "tags": [op.tag], "parameters": params, "responses": responses});
    if let Some(body) = op.body {
        out["requestBody"] = json!({"required": true, "content": json_content(schema_ref(body))});
    }
    out
}

fn path_item(path: &str, ops: Vec<(&str, Op)>) -> (String, Value) {
    let mut item = Map::new();
    for (method, op) in ops {
        item.insert(method.to_string(), operation(path, op));
    }
    (path.to_string(), Value::Object(item))
}

fn op(summary: &'static str, tag: &'static str, body: Option<&'static str>, ok: (u16, Option<Value>), errors: &'static [u16]) -> Op {
    Op { summary, tag, body, ok, errors, extra_params: Vec::new() }
}

/// The query parameters of the message lists.
fn message_filters() -> Vec<Value> {
    let q = |name: &str, schema: Value, description: &str| json!({"name": name, "in": "query", "required": false, "schema": schema, "description": description});
    let text = json!({"type": "string"});
    vec![
        q("page_size", json!({"type": "integer", "minimum": 1, "maximum": 50, "default": 50}), "Messages per answer"),
        q("after", text.clone(), "A page_info.after cursor: older messages"),
        q("before", text.clone(), "A page_info.before cursor: newer messages"),
        q("source", text.clone(), "A workflow key"),
        q("tenant", text.clone(), "A tenant id"),
        q("channel_id", text.clone(), "A Channel's name"),
        q("status", json!({"type": "array", "items": {"type": "string"}}), "Delivery statuses (repeat, or status[])"),
        q("message_ids", json!({"type": "array", "items": {"type": "string"}}), "Message ids (repeat, or message_ids[])"),
        q("workflow_run_id", text.clone(), "A workflow run id"),
        q("workflow_recipient_run_id", text.clone(), "A workflow recipient run id"),
        q("inserted_at.gt", text.clone(), "RFC 3339; also inserted_at.gte, .lt, .lte, or inserted_at[gt] and so on"),
    ]
}

const WRITE: &[u16] = &[400, 404, 413, 422];
const READ: &[u16] = &[404, 422];

fn schemas() -> Value {
    let recipient = json!({"oneOf": [
        {"type": "string", "description": "A user id"},
        {"type": "object", "required": ["id"], "additionalProperties": true,
         "properties": {"id": {"type": "string"}, "collection": {"type": "string", "description": "Present for objects"},
                        "channel_data": {"type": "object"}, "preferences": {"type": "object"},
                        "$trigger_data": {"type": "object", "description": "Merged over data for this recipient"}}}
    ]});
    let reference = json!({"oneOf": [
        {"type": "string"},
        {"type": "object", "required": ["id", "collection"], "properties": {"id": {"type": "string"}, "collection": {"type": "string"}}}
    ]});
    let tenant = json!({"oneOf": [{"type": "string"}, {"type": "object", "required": ["id"], "additionalProperties": true}]});
    let preference_set = json!({"type": "object", "additionalProperties": false, "properties": {
        "workflows": {"type": "object"}, "categories": {"type": "object"},
        "channel_types": {"type": "object", "additionalProperties": {"type": "boolean"}}}});
    let mut schemas = Map::new();
    schemas.insert(
        "Error".into(),
        json!({"type": "object", "required": ["code", "message", "status", "type"], "properties": {
            "code": {"type": "string"}, "message": {"type": "string"}, "status": {"type": "integer"}, "type": {"type": "string"},
            "errors": {"type": "array", "items": {"type": "object", "properties": {
                "field": {"type": "string", "description": "JSON pointer into the request body"}, "message": {"type": "string"}}}},
            "workflow_run_id": {"type": "string", "description": "The run that holds an idempotency key"}}}),
    );
    schemas.insert("Recipient".into(), json!(recipient));
    schemas.insert("RecipientReference".into(), json!(reference));
    schemas.insert(
        "TriggerRequest".into(),
        json!({"type": "object", "required": ["recipients"], "additionalProperties": false, "properties": {
            "recipients": {"type": "array", "minItems": 1, "maxItems": 1000, "items": schema_ref("Recipient")},
            "actor": schema_ref("Recipient"),
            "data": {"type": "object", "nullable": true, "description": "Validated against the Workflow's dataSchema"},
            "cancellation_key": {"type": "string", "nullable": true, "maxLength": 1024},
            "tenant": tenant}}),
    );
    schemas.insert(
        "TriggerResponse".into(),
        json!({"type": "object", "required": ["workflow_run_id"], "properties": {
            "workflow_run_id": {"type": "string", "format": "uuid", "description": "The TriggerRun's metadata.uid"}}}),
    );
    schemas.insert(
        "CancelRequest".into(),
        json!({"type": "object", "required": ["cancellation_key"], "additionalProperties": false, "properties": {
            "cancellation_key": {"type": "string"},
            "recipients": {"type": "array", "items": schema_ref("RecipientReference")}}}),
    );
    schemas.insert(
        "NotifyRequest".into(),
        json!({"type": "object", "required": ["name", "data"], "additionalProperties": false,
            "description": "The older notify API; recipients, lists, or both are required",
            "properties": {
                "name": {"type": "string", "description": "The workflow key"},
                "actor": schema_ref("Recipient"),
                "recipients": {"type": "array", "maxItems": 1000, "items": schema_ref("Recipient")},
                "lists": {"type": "array", "items": {"type": "string"}, "description": "Audience keys"},
                "data": {"type": "object"},
                "cancellation_key": {"type": "string"},
                "tenant": tenant,
                "idempotencyKey": {"type": "string", "maxLength": 255}}}),
    );
    schemas.insert(
        "UserRequest".into(),
        json!({"type": "object", "additionalProperties": true, "properties": {
            "name": {"type": "string"}, "email": {"type": "string"}, "phone_number": {"type": "string"}, "timezone": {"type": "string"},
            "channel_data": {"type": "object"}, "preferences": {"type": "object", "additionalProperties": schema_ref("PreferenceSetRequest")}}}),
    );
    schemas.insert(
        "User".into(),
        json!({"type": "object", "additionalProperties": true, "properties": {
            "__typename": {"type": "string"}, "id": {"type": "string"}, "name": {"type": "string", "nullable": true},
            "email": {"type": "string", "nullable": true}, "phone_number": {"type": "string", "nullable": true},
            "timezone": {"type": "string", "nullable": true}, "created_at": {"type": "string"}, "updated_at": {"type": "string"}}}),
    );
    schemas.insert("PreferenceSetRequest".into(), json!(preference_set));
    schemas.insert(
        "PreferenceSet".into(),
        json!({"type": "object", "properties": {
            "__typename": {"type": "string"}, "id": {"type": "string"}, "workflows": {"type": "object"},
            "categories": {"type": "object"}, "channel_types": {"type": "object"}}}),
    );
    schemas.insert("ChannelDataRequest".into(), json!({"type": "object", "required": ["data"], "properties": {"data": {"type": "object"}}}));
    schemas.insert("ChannelData".into(), json!({"type": "object", "properties": {"__typename": {"type": "string"}, "channel_id": {"type": "string"}, "data": {"type": "object"}}}));
    schemas.insert(
        "ObjectRequest".into(),
        json!({"type": "object", "additionalProperties": true, "properties": {
            "channel_data": {"type": "object"}, "preferences": {"type": "object"}}}),
    );
    schemas.insert(
        "Object".into(),
        json!({"type": "object", "properties": {
            "__typename": {"type": "string"}, "id": {"type": "string"}, "collection": {"type": "string"},
            "properties": {"type": "object"}, "created_at": {"type": "string"}, "updated_at": {"type": "string"}}}),
    );
    schemas.insert(
        "SubscriptionsRequest".into(),
        json!({"type": "object", "required": ["recipients"], "properties": {
            "recipients": {"type": "array", "minItems": 1, "items": schema_ref("Recipient")}, "properties": {"type": "object"}}}),
    );
    schemas.insert(
        "UnsubscribeRequest".into(),
        json!({"type": "object", "required": ["recipients"], "properties": {
            "recipients": {"type": "array", "minItems": 1, "items": schema_ref("RecipientReference")}}}),
    );
    schemas.insert(
        "Subscription".into(),
        json!({"type": "object", "properties": {
            "__typename": {"type": "string"}, "object": schema_ref("Object"), "recipient": {"type": "object"},
            "properties": {"type": "object"}, "inserted_at": {"type": "string"}, "updated_at": {"type": "string"}}}),
    );
    schemas.insert(
        "TenantRequest".into(),
        json!({"type": "object", "additionalProperties": true, "properties": {
            "name": {"type": "string"}, "settings": {"type": "object", "properties": {
                "branding": {"type": "object"}, "preference_set": schema_ref("PreferenceSetRequest")}}}}),
    );
    schemas.insert(
        "Tenant".into(),
        json!({"type": "object", "additionalProperties": true, "properties": {
            "__typename": {"type": "string"}, "id": {"type": "string"}, "name": {"type": "string", "nullable": true},
            "settings": {"type": "object"}}}),
    );
    schemas.insert(
        "WorkflowRecipientRun".into(),
        json!({"type": "object", "properties": {
            "__typename": {"type": "string"}, "id": {"type": "string", "format": "uuid"},
            "workflow": {"type": "string"}, "workflow_run_id": {"type": "string", "format": "uuid"},
            "recipient": schema_ref("RecipientReference"),
            "status": {"type": "string", "enum": ["queued", "processing", "completed", "cancelled"]},
            "state": {"type": "string", "description": "herald's state: Queued, Running, Waiting, Completed, Skipped, Cancelled, Failed"},
            "reason": {"type": "string", "nullable": true}, "message": {"type": "string", "nullable": true},
            "actor": {"nullable": true}, "tenant": {"type": "string", "nullable": true},
            "trigger_source": {"type": "object"}, "error_count": {"type": "integer"},
            "inserted_at": {"type": "string"}, "updated_at": {"type": "string"},
            "events": {"type": "array", "items": {"type": "object"}}, "steps": {"type": "array", "items": {"type": "object"}}}}),
    );
    schemas.insert(
        "WorkflowRun".into(),
        json!({"type": "object", "properties": {
            "__typename": {"type": "string"}, "id": {"type": "string", "format": "uuid"}, "name": {"type": "string"},
            "workflow": {"type": "string"},
            "status": {"type": "string", "enum": ["pending", "running", "completed", "failed", "cancelled"]},
            "totals": {"type": "object", "nullable": true}, "conditions": {"type": "array", "items": {"type": "object"}},
            "recipient_runs": {"type": "object", "description": "A page of the run's recipients' runs (Knock's list shape)", "properties": {
                "entries": {"type": "array", "items": schema_ref("WorkflowRecipientRun")},
                "page_info": schema_ref("PageInfo")}}}}),
    );
    schemas.insert(
        "Message".into(),
        json!({"type": "object", "description": "One channel step's outcome for one recipient (from the history store)", "properties": {
            "__typename": {"type": "string"}, "__cursor": {"type": "string"}, "id": {"type": "string", "format": "uuid"},
            "channel_id": {"type": "string", "description": "The Channel's name"}, "recipient": schema_ref("RecipientReference"),
            "actors": {"type": "array", "items": schema_ref("RecipientReference")}, "workflow": {"type": "string"}, "tenant": {"type": "string", "nullable": true},
            "status": {"type": "string", "enum": ["sent", "delivered", "undelivered", "not_sent"]},
            "inserted_at": {"type": "string"}, "updated_at": {"type": "string"}, "source": {"type": "object"}, "data": {"nullable": true},
            "metadata": {"type": "object"}, "reason": {"type": "string"}, "attempts": {"type": "array", "items": {"type": "object"}},
            "content": {"type": "object", "nullable": true, "description": "The rendered template fields"}}}),
    );
    schemas.insert(
        "Feed".into(),
        json!({"type": "object", "properties": {
            "entries": {"type": "array", "items": {"type": "object", "description": "A FeedItem: id, __cursor, blocks, actors, data, source, tenant, engagement times"}},
            "meta": {"type": "object", "properties": {"total_count": {"type": "integer"}, "unread_count": {"type": "integer"}, "unseen_count": {"type": "integer"}}},
            "page_info": schema_ref("PageInfo"), "vars": {"type": "object"}}}),
    );
    schemas
        .insert("MessageList".into(), json!({"type": "object", "properties": {"items": {"type": "array", "items": schema_ref("Message")}, "page_info": schema_ref("PageInfo")}}));
    let rule = json!({"type": "object", "required": ["frequency"], "properties": {
        "__typename": {"type": "string"}, "frequency": {"type": "string", "enum": ["hourly", "daily", "weekly", "monthly"]},
        "interval": {"type": "integer", "minimum": 1}, "days": {"description": "[mon … sun], or \"weekdays\" / \"weekends\""},
        "day_of_month": {"type": "integer", "nullable": true, "minimum": 1, "maximum": 31},
        "hours": {"type": "integer", "nullable": true, "minimum": 0, "maximum": 23}, "minutes": {"type": "integer", "nullable": true, "minimum": 0, "maximum": 59}}});
    schemas.insert("ScheduleRepeatRule".into(), rule);
    let timing = json!({
        "repeats": {"type": "array", "items": schema_ref("ScheduleRepeatRule")}, "scheduled_at": {"type": "string", "format": "date-time", "nullable": true},
        "ending_at": {"type": "string", "format": "date-time", "nullable": true}, "data": {"type": "object", "nullable": true},
        "actor": {"nullable": true}, "tenant": {"nullable": true}});
    let mut create = timing.clone();
    create["workflow"] = json!({"type": "string"});
    create["recipients"] = json!({"type": "array", "minItems": 1, "maxItems": 100, "items": schema_ref("Recipient")});
    schemas.insert("ScheduleCreateRequest".into(), json!({"type": "object", "required": ["workflow", "recipients"], "properties": create}));
    let mut update = timing;
    update["schedule_ids"] = json!({"type": "array", "minItems": 1, "maxItems": 100, "items": {"type": "string"}});
    schemas.insert("ScheduleUpdateRequest".into(), json!({"type": "object", "required": ["schedule_ids"], "properties": update}));
    schemas.insert(
        "ScheduleDeleteRequest".into(),
        json!({"type": "object", "required": ["schedule_ids"], "properties": {"schedule_ids": {"type": "array", "minItems": 1, "maxItems": 100, "items": {"type": "string"}}}}),
    );
    schemas.insert(
        "Schedule".into(),
        json!({"type": "object", "properties": {
            "__typename": {"type": "string"}, "id": {"type": "string", "format": "uuid"}, "workflow": {"type": "string"},
            "recipient": {"type": "object"}, "actor": {"nullable": true}, "tenant": {"type": "string", "nullable": true}, "data": {"type": "object"},
            "repeats": {"type": "array", "items": schema_ref("ScheduleRepeatRule")},
            "last_occurrence_at": {"type": "string", "nullable": true}, "next_occurrence_at": {"type": "string", "nullable": true},
            "inserted_at": {"type": "string"}, "updated_at": {"type": "string"}}}),
    );
    schemas.insert(
        "ScheduleList".into(),
        json!({"type": "object", "properties": {"entries": {"type": "array", "items": schema_ref("Schedule")}, "page_info": schema_ref("PageInfo")}}),
    );
    schemas.insert(
        "SubscriptionList".into(),
        json!({"type": "object", "properties": {"entries": {"type": "array", "items": schema_ref("Subscription")}, "page_info": schema_ref("PageInfo")}}),
    );
    schemas.insert(
        "AudienceMembersRequest".into(),
        json!({"type": "object", "required": ["members"], "properties": {"members": {"type": "array", "maxItems": 1000, "items": {"type": "object", "required": ["user"], "properties": {
            "user": {"type": "object", "required": ["id"], "description": "The user: `{id}`, or with properties to identify it"},
            "tenant": {"type": "string"}}}}}}),
    );
    schemas.insert(
        "AudienceMemberList".into(),
        json!({"type": "object", "properties": {"entries": {"type": "array", "items": {"type": "object", "properties": {
            "__typename": {"type": "string"}, "user_id": {"type": "string"}, "user": {"type": "object"}, "tenant": {"type": "string", "nullable": true},
            "added_at": {"type": "string", "nullable": true, "description": "Not kept by herald: null"}}}}, "page_info": schema_ref("PageInfo")}}),
    );
    schemas.insert(
        "PageInfo".into(),
        json!({"type": "object", "properties": {
            "__typename": {"type": "string"},
            "after": {"type": "string", "nullable": true, "description": "The cursor of the next entries (pass as `after`); null at the end"},
            "before": {"type": "string", "nullable": true, "description": "The cursor of the previous entries (pass as `before`); null at the start"},
            "page_size": {"type": "integer"}}}),
    );
    Value::Object(schemas)
}

fn schedule_filters(workflow_required: bool) -> Vec<Value> {
    vec![
        json!({"name": "workflow", "in": "query", "required": workflow_required, "schema": {"type": "string"}, "description": "The workflow key"}),
        json!({"name": "tenant", "in": "query", "required": false, "schema": {"type": "string"}, "description": "Only this tenant's schedules"}),
        json!({"name": "recipients[]", "in": "query", "required": false, "schema": {"type": "array", "items": {"type": "string"}}, "description": "Only these recipients"}),
        json!({"name": "page_size", "in": "query", "required": false, "schema": {"type": "integer", "minimum": 1, "maximum": 50, "default": 50}}),
        json!({"name": "after", "in": "query", "required": false, "schema": {"type": "string"}, "description": "A page_info.after cursor"}),
        json!({"name": "before", "in": "query", "required": false, "schema": {"type": "string"}, "description": "A page_info.before cursor"}),
    ]
}

/// The document.
pub fn document() -> Value {
    let tenant_query = || {
        json!({"name": "tenant", "in": "query", "required": false, "schema": {"type": "string"},
        "description": "A tenant id: the user's preferences within that tenant (set `default`)"})
    };
    let idempotency_header = json!({"name": "Idempotency-Key", "in": "header", "required": false,
        "schema": {"type": "string", "maxLength": 255},
        "description": "A repeat within 7 days replays the first response (header idempotent-replayed: true); different parameters: 422"});
    let paths: Map<String, Value> = [
        path_item(
            "/v1/workflows/{key}/trigger",
            vec![(
                "post",
                Op {
                    extra_params: vec![idempotency_header],
                    ..op(
                        "Trigger a workflow: stores a TriggerRun and returns its uid",
                        "Workflows",
                        Some("TriggerRequest"),
                        (200, Some(schema_ref("TriggerResponse"))),
                        &[400, 404, 413, 422],
                    )
                },
            )],
        ),
        path_item(
            "/v1/workflows/{key}/cancel",
            vec![("post", op("Cancel the runs of a workflow with a cancellation key: stores a Cancellation", "Workflows", Some("CancelRequest"), (204, None), WRITE))],
        ),
        path_item(
            "/v1/notify",
            vec![(
                "post",
                op(
                    "Trigger a workflow (older API): lists are Audience keys",
                    "Workflows",
                    Some("NotifyRequest"),
                    (200, Some(schema_ref("TriggerResponse"))),
                    &[400, 404, 409, 413, 422],
                ),
            )],
        ),
        path_item(
            "/v1/users/{user_id}",
            vec![
                ("put", op("Identify (create or update) a user", "Users", Some("UserRequest"), (200, Some(schema_ref("User"))), WRITE)),
                ("get", op("Get a user", "Users", None, (200, Some(schema_ref("User"))), READ)),
                ("delete", op("Delete a user", "Users", None, (204, None), READ)),
            ],
        ),
        path_item(
            "/v1/users/{user_id}/preferences/{set}",
            vec![
                (
                    "put",
                    Op {
                        extra_params: vec![tenant_query()],
                        ..op("Set a user's preference set", "Users", Some("PreferenceSetRequest"), (200, Some(schema_ref("PreferenceSet"))), WRITE)
                    },
                ),
                ("get", Op { extra_params: vec![tenant_query()], ..op("Get a user's preference set", "Users", None, (200, Some(schema_ref("PreferenceSet"))), READ) }),
            ],
        ),
        path_item(
            "/v1/users/{user_id}/channel_data/{channel}",
            vec![
                ("put", op("Set a user's channel data", "Users", Some("ChannelDataRequest"), (200, Some(schema_ref("ChannelData"))), WRITE)),
                ("get", op("Get a user's channel data", "Users", None, (200, Some(schema_ref("ChannelData"))), READ)),
                ("delete", op("Remove a user's channel data", "Users", None, (204, None), READ)),
            ],
        ),
        path_item(
            "/v1/objects/{collection}/{id}",
            vec![
                ("put", op("Set (create or update) an object", "Objects", Some("ObjectRequest"), (200, Some(schema_ref("Object"))), WRITE)),
                ("get", op("Get an object", "Objects", None, (200, Some(schema_ref("Object"))), READ)),
                ("delete", op("Delete an object", "Objects", None, (204, None), READ)),
            ],
        ),
        path_item(
            "/v1/objects/{collection}/{id}/subscriptions",
            vec![
                (
                    "post",
                    op(
                        "Subscribe recipients to an object",
                        "Objects",
                        Some("SubscriptionsRequest"),
                        (200, Some(json!({"type": "array", "items": schema_ref("Subscription")}))),
                        WRITE,
                    ),
                ),
                (
                    "delete",
                    op(
                        "Unsubscribe recipients from an object",
                        "Objects",
                        Some("UnsubscribeRequest"),
                        (200, Some(json!({"type": "array", "items": schema_ref("Subscription")}))),
                        WRITE,
                    ),
                ),
                ("get", op("List an object's subscriptions (page_size, after)", "Objects", None, (200, Some(schema_ref("SubscriptionList"))), READ)),
            ],
        ),
        path_item(
            "/v1/audiences/{key}/members",
            vec![
                ("post", op("Add members to an audience (up to 1,000 a call; members live in MemberSlices)", "Audiences", Some("AudienceMembersRequest"), (204, None), WRITE)),
                ("delete", op("Remove members from an audience", "Audiences", Some("AudienceMembersRequest"), (204, None), WRITE)),
                ("get", op("List an audience's members (page_size, after)", "Audiences", None, (200, Some(schema_ref("AudienceMemberList"))), READ)),
            ],
        ),
        path_item(
            "/v1/tenants/{id}",
            vec![
                ("put", op("Set (create or update) a tenant", "Tenants", Some("TenantRequest"), (200, Some(schema_ref("Tenant"))), WRITE)),
                ("get", op("Get a tenant", "Tenants", None, (200, Some(schema_ref("Tenant"))), READ)),
                ("delete", op("Delete a tenant", "Tenants", None, (204, None), READ)),
            ],
        ),
        path_item(
            "/v1/schedules",
            vec![
                (
                    "post",
                    op(
                        "Create schedules: one per recipient",
                        "Schedules",
                        Some("ScheduleCreateRequest"),
                        (200, Some(json!({"type": "array", "items": schema_ref("Schedule")}))),
                        WRITE,
                    ),
                ),
                (
                    "put",
                    op(
                        "Update schedules by id (the same values for each)",
                        "Schedules",
                        Some("ScheduleUpdateRequest"),
                        (200, Some(json!({"type": "array", "items": schema_ref("Schedule")}))),
                        WRITE,
                    ),
                ),
                ("delete", op("Delete schedules by id", "Schedules", Some("ScheduleDeleteRequest"), (200, Some(json!({"type": "array", "items": schema_ref("Schedule")}))), WRITE)),
                (
                    "get",
                    Op {
                        extra_params: schedule_filters(true),
                        ..op("List a workflow's schedules, newest first", "Schedules", None, (200, Some(schema_ref("ScheduleList"))), READ)
                    },
                ),
            ],
        ),
        path_item(
            "/v1/users/{user_id}/schedules",
            vec![(
                "get",
                Op { extra_params: schedule_filters(false), ..op("List a user's schedules, newest first", "Schedules", None, (200, Some(schema_ref("ScheduleList"))), READ) },
            )],
        ),
        path_item(
            "/v1/workflow_runs/{id}",
            vec![(
                "get",
                Op {
                    extra_params: vec![
                        json!({"name": "page_size", "in": "query", "required": false, "schema": {"type": "integer", "minimum": 1, "maximum": 50, "default": 50},
                            "description": "Recipients' runs per answer"}),
                        json!({"name": "after", "in": "query", "required": false, "schema": {"type": "string"},
                            "description": "A page_info.after cursor: the recipients' runs from there on"}),
                        json!({"name": "before", "in": "query", "required": false, "schema": {"type": "string"},
                            "description": "A page_info.before cursor: the recipients' runs just before it"}),
                    ],
                    ..op("Get a workflow run (a TriggerRun, by workflow_run_id) with a page of its recipients' runs", "Runs", None, (200, Some(schema_ref("WorkflowRun"))), READ)
                },
            )],
        ),
        path_item("/v1/workflow_recipient_runs/{id}", vec![("get", op("Get one recipient's run", "Runs", None, (200, Some(schema_ref("WorkflowRecipientRun"))), READ))]),
        path_item(
            "/v1/messages",
            vec![("get", Op { extra_params: message_filters(), ..op("List messages, newest first", "Messages", None, (200, Some(schema_ref("MessageList"))), READ) })],
        ),
        path_item("/v1/messages/{message_id}", vec![("get", op("Get a message", "Messages", None, (200, Some(schema_ref("Message"))), READ))]),
        path_item(
            "/v1/users/{user_id}/messages",
            vec![("get", Op { extra_params: message_filters(), ..op("List a user's messages, newest first", "Messages", None, (200, Some(schema_ref("MessageList"))), READ) })],
        ),
        path_item(
            "/v1/users/{user_id}/feeds/{channel_id}",
            vec![("get", op("A user's in-app feed of one channel, newest first, with counts", "Feeds", None, (200, Some(schema_ref("Feed"))), READ))],
        ),
        path_item("/v1/users/{user_id}/feeds/{channel_id}/settings", vec![("get", op("Feed settings (no branding)", "Feeds", None, (200, None), READ))]),
        path_item(
            "/v1/messages/{message_id}/{status}",
            vec![
                ("put", op("Set a message's engagement status (seen, read, archived, interacted)", "Feeds", None, (200, Some(schema_ref("Message"))), READ)),
                ("delete", op("Remove a message's engagement status (seen, read, archived)", "Feeds", None, (200, Some(schema_ref("Message"))), READ)),
            ],
        ),
        path_item("/v1/messages/batch/{action}", vec![("post", op("Change the engagement status of several messages", "Feeds", None, (200, None), WRITE))]),
        path_item(
            "/v1/channels/{channel_id}/messages/bulk/{action}",
            vec![("post", op("Change the engagement status of every matching feed message of some users", "Feeds", None, (200, None), WRITE))],
        ),
        path_item(
            "/v1/objects/{collection}/{id}/messages",
            vec![("get", Op { extra_params: message_filters(), ..op("List an object's messages, newest first", "Messages", None, (200, Some(schema_ref("MessageList"))), READ) })],
        ),
    ]
    .into_iter()
    .collect();
    json!({
        "openapi": "3.0.3",
        "info": {
            "title": "herald API",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Knock-compatible notification API served by herald. Every accepted request becomes a Kubernetes resource (TriggerRun, Cancellation, User, Object, Tenant) in the caller's namespace."
        },
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}],
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                "description": "An API key (a Secret in herald's API-key namespace labelled herald.dev/api-key=true, data key `key`, annotation herald.dev/namespace naming where it acts) or a Kubernetes ServiceAccount token"}},
            "schemas": schemas(),
        },
        "paths": paths,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    #[test]
    fn documents_exactly_the_routes_served() {
        let doc = document();
        let documented: BTreeSet<(String, String)> =
            doc["paths"].as_object().unwrap().iter().flat_map(|(path, item)| item.as_object().unwrap().keys().map(move |m| (m.clone(), path.clone()))).collect();
        let served: BTreeSet<(String, String)> = crate::http::api::ROUTES.iter().map(|(m, p)| (m.to_string(), p.to_string())).collect();
        assert_eq!(documented, served);
    }

    #[test]
    fn every_reference_resolves() {
        let doc = document();
        let text = doc.to_string();
        for piece in text.split("\"$ref\":\"#/components/schemas/").skip(1) {
            let name = piece.split('"').next().unwrap();
            assert!(doc["components"]["schemas"].get(name).is_some(), "missing schema {name}");
        }
    }
}

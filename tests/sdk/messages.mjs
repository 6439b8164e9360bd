// Reads herald's history back through the official Knock Node SDK, unmodified:
// trigger, list messages with filters, page through them with the SDK's own
// cursor iterator, get one, list a user's and an object's messages. Run by
// tests/api_sdk.rs against a herald with a history store, after it made the
// Channels `sdk-hook` (answers 200) and `sdk-down` (answers 500) and the
// workflows `sdk-notify` (one step, `hook`, on sdk-hook) and `sdk-alarm` (one
// step, `alarm`, on sdk-down). Prints a JSON summary on stdout.
import Knock, { APIError, NotFoundError, UnprocessableEntityError } from "@knocklabs/node";

const knock = new Knock({ apiKey: process.env.HERALD_API_KEY, maxRetries: 0, timeout: 20_000 });
const summary = {};

async function until(what, check, ms = 60_000) {
  const deadline = Date.now() + ms;
  for (;;) {
    const value = await check();
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 200));
  }
}

// Every message the SDK's auto-pagination yields.
async function all(list) {
  const messages = [];
  for await (const message of list) messages.push(message);
  return messages;
}

// The error the SDK raised, and whether it is of the SDK's class `expected`.
async function expectError(promise, expected) {
  try {
    await promise;
  } catch (e) {
    if (!(e instanceof APIError)) throw e;
    return { status: e.status, code: e.error?.code, expected_class: e instanceof expected, fields: (e.error?.errors ?? []).map((f) => f.field) };
  }
  throw new Error("expected an error");
}

await knock.users.update("sdk-a", { name: "A" });
await knock.users.update("sdk-b", { name: "B" });
await knock.objects.set("projects", "sdk-p1", { name: "SDK project" });
await knock.tenants.set("sdk-tenant", { name: "SDK Tenant" });

// Three recipients, one channel step: three messages, all sent. Then one undelivered.
const run = await knock.workflows.trigger("sdk-notify", {
  recipients: ["sdk-a", "sdk-b", { id: "sdk-p1", collection: "projects" }],
  tenant: "sdk-tenant",
  data: { n: 7 },
});
summary.run_id = run.workflow_run_id;
const alarm = await knock.workflows.trigger("sdk-alarm", { recipients: ["sdk-a"] });
summary.alarm_run_id = alarm.workflow_run_id;

// Messages are written in batches off the delivery path: they land a moment after the deliveries.
await until("the run's three messages", async () => (await knock.messages.list({ workflow_run_id: run.workflow_run_id })).items.length === 3);
await until("the alarm's message", async () => (await knock.messages.list({ workflow_run_id: alarm.workflow_run_id })).items.length === 1);

// One message a page: the SDK's pages follow page_info.after to the end.
const first = await knock.messages.list({ workflow_run_id: run.workflow_run_id, page_size: 1 });
summary.pages = [];
for await (const page of first.iterPages()) summary.pages.push(page.items.map((m) => m.id));
summary.paged = await all(knock.messages.list({ workflow_run_id: run.workflow_run_id, page_size: 1 }));
summary.one_page = (await knock.messages.list({ workflow_run_id: run.workflow_run_id })).items.map((m) => m.id);

// Filters, as the SDK encodes them (status[]=, inserted_at[gte]=).
const ids = async (query) => (await all(knock.messages.list(query))).map((m) => m.id);
summary.filtered = {
  undelivered: await all(knock.messages.list({ status: ["undelivered"] })),
  sent_or_undelivered: await ids({ status: ["sent", "undelivered"], page_size: 2 }),
  channel: await ids({ channel_id: "sdk-down" }),
  source: await ids({ source: "sdk-notify" }),
  tenant: await ids({ tenant: "sdk-tenant" }),
  since_2000: await ids({ inserted_at: { gte: "2000-01-01T00:00:00Z" }, source: "sdk-notify" }),
  before_2000: await ids({ inserted_at: { lt: "2000-01-01T00:00:00Z" } }),
};
summary.filtered.recipient_run = await ids({ workflow_recipient_run_id: summary.paged[0].metadata.workflow_recipient_run_id });
summary.filtered.message_ids = await ids({ message_ids: [summary.paged[0].id, summary.paged[1].id] });

// One by id, and by recipient.
summary.get = await knock.messages.get(summary.paged[0].id);
summary.user_a = await all(knock.users.listMessages("sdk-a", { page_size: 1 }));
summary.user_b = await all(knock.users.listMessages("sdk-b"));
summary.object = await all(knock.objects.listMessages("projects", "sdk-p1"));
summary.user_a_sent = await all(knock.users.listMessages("sdk-a", { status: ["sent"] }));

// Errors: an unknown message, and a filter herald cannot match is refused, not ignored.
summary.missing = await expectError(knock.messages.get("00000000-0000-4000-8000-000000000000"), NotFoundError);
summary.engagement = await expectError(knock.messages.list({ engagement_status: ["seen"] }), UnprocessableEntityError);

console.log(JSON.stringify(summary));

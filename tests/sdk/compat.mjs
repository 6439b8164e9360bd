// Drives herald's HTTP API with the official Knock Node SDK, unmodified:
// identify a user and more, trigger workflows, cancel one, read the outcome
// and the SDK's view of errors. Run by tests/api_sdk.rs, which sets
// KNOCK_BASE_URL (the SDK's own variable) and HERALD_API_KEY, and checks the
// JSON summary printed on stdout against the cluster.
import { createHash } from "node:crypto";
import Knock, { APIError, NotFoundError, UnprocessableEntityError } from "@knocklabs/node";

const knock = new Knock({ apiKey: process.env.HERALD_API_KEY, maxRetries: 0, timeout: 20_000 });
const summary = { steps: [] };
const step = (name, value) => summary.steps.push({ name, value });

// Knock derives recipient run ids from the run id; herald documents how:
// UUID v5, namespace = workflow run id, name = "user:<id>".
function uuidv5(namespace, name) {
  const ns = Buffer.from(namespace.replace(/-/g, ""), "hex");
  const hash = createHash("sha1").update(Buffer.concat([ns, Buffer.from(name, "utf8")])).digest();
  const b = hash.subarray(0, 16);
  b[6] = (b[6] & 0x0f) | 0x50;
  b[8] = (b[8] & 0x3f) | 0x80;
  const h = b.toString("hex");
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

async function until(what, check, ms = 60_000) {
  const deadline = Date.now() + ms;
  for (;;) {
    const value = await check();
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 200));
  }
}

// A recipient run is listed once herald has expanded the run's recipients.
async function recipientRun(id) {
  try {
    return await knock.workflowRecipientRuns.get(id);
  } catch (e) {
    if (e instanceof NotFoundError) return null;
    throw e;
  }
}

async function expectError(what, promise) {
  try {
    await promise;
  } catch (e) {
    if (!(e instanceof APIError)) throw e;
    step(what, { status: e.status, code: e.error?.code, type: e.error?.type, class: e.constructor.name });
    return e;
  }
  throw new Error(`${what}: expected an error`);
}

// Users, objects, tenants.
const user = await knock.users.update("sdk-user-1", { name: "Sam Dee", email: "sam@example.com", plan: "team" });
step("users.update", user);
step("users.get", await knock.users.get("sdk-user-1"));
step("users.setPreferences", await knock.users.setPreferences("sdk-user-1", "default", { channel_types: { email: true }, workflows: { "sdk-flow": true } }));
step("users.getPreferences", await knock.users.getPreferences("sdk-user-1", "default"));
step("users.setChannelData", await knock.users.setChannelData("sdk-user-1", "hooks", { data: { url: "http://127.0.0.1:9/hook" } }));
step("users.getChannelData", await knock.users.getChannelData("sdk-user-1", "hooks"));
await knock.users.update("sdk-user-2", { name: "Second" });
step("objects.set", await knock.objects.set("projects", "sdk-p1", { name: "SDK project" }));
step("objects.addSubscriptions", await knock.objects.addSubscriptions("projects", "sdk-p1", { recipients: ["sdk-user-2"], properties: { role: "watcher" } }));
step("tenants.set", await knock.tenants.set("sdk-tenant", { name: "SDK Tenant", settings: { branding: { primary_color: "#123456" } } }));
step("tenants.get", await knock.tenants.get("sdk-tenant"));

// Trigger, then read each recipient's outcome.
const run = await knock.workflows.trigger("sdk-flow", {
  recipients: ["sdk-user-1", { id: "sdk-p1", collection: "projects" }],
  actor: "sdk-user-2",
  tenant: "sdk-tenant",
  data: { message: "hello from the SDK" },
  cancellation_key: "sdk-ck-1",
});
step("workflows.trigger", run);
const recipientRunId = uuidv5(run.workflow_run_id, "user:sdk-user-1");
const outcome = await until("the recipient run to complete", async () => {
  const r = await recipientRun(recipientRunId);
  return r?.status === "completed" ? r : null;
});
step("workflowRecipientRuns.get", outcome);

// Trigger a long workflow, cancel it, read the cancellation.
const slow = await knock.workflows.trigger("sdk-slow", { recipients: ["sdk-user-1", "sdk-user-2"], cancellation_key: "sdk-ck-2" });
step("workflows.trigger slow", slow);
const slowRun = uuidv5(slow.workflow_run_id, "user:sdk-user-2");
await until("the slow run to wait", async () => {
  const r = await recipientRun(slowRun);
  return r?.state === "Waiting" ? r : null;
});
step("workflows.cancel", (await knock.workflows.cancel("sdk-slow", { cancellation_key: "sdk-ck-2" })) ?? null);
step("cancelled", await until("the cancellation", async () => {
  const r = await recipientRun(slowRun);
  return r?.status === "cancelled" ? r : null;
}));

// Errors, as the SDK reports them.
const missing = await expectError("trigger unknown workflow", knock.workflows.trigger("no-such-flow", { recipients: ["sdk-user-1"] }));
summary.missing_is_not_found = missing instanceof NotFoundError;
const invalid = await expectError("trigger invalid data", knock.workflows.trigger("sdk-flow", { recipients: ["sdk-user-1"], data: { message: 42 } }));
summary.invalid_is_unprocessable = invalid instanceof UnprocessableEntityError;
summary.invalid_errors = invalid.error?.errors;
await expectError("get deleted user", knock.users.delete("sdk-user-2").then(() => knock.users.get("sdk-user-2")));
const wrongKey = new Knock({ apiKey: "sk_not_a_herald_key_at_all", maxRetries: 0 });
await expectError("wrong key", wrongKey.users.get("sdk-user-1"));

console.log(JSON.stringify(summary));

// Drives herald's schedules API with the official Knock Node SDK, unmodified:
// create (one schedule per recipient), list with paging, update, a user's
// schedules, delete, a one-off that fires, and an error. Run by
// tests/api_sdk.rs, which checks the JSON summary printed on stdout against
// the cluster.
import Knock, { APIError } from "@knocklabs/node";

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

await knock.users.update("sch-1", { name: "Sam", timezone: "America/New_York" });

// Two recipients, one of them inline (identified first): two schedules.
summary.created = await knock.schedules.create({
  workflow: "sdk-sched",
  recipients: ["sch-1", { id: "sch-2", name: "Kim", timezone: "Europe/Paris" }],
  repeats: [{ frequency: "weekly", days: ["mon", "wed"], hours: 9, minutes: 30 }],
  data: { digest: true },
  tenant: "sdk-tenant",
});

// A one-off two seconds from now.
const at = new Date(Math.ceil(Date.now() / 1000) * 1000 + 2000).toISOString().replace(".000Z", "Z");
summary.once_at = at;
summary.once = (await knock.schedules.create({ workflow: "sdk-sched", recipients: ["sch-1"], scheduled_at: at, data: { once: true } }))[0];

// Paging: two a page, following page_info.after.
const first = await knock.schedules.list({ workflow: "sdk-sched", page_size: 2 });
summary.first_page = first.entries.map((s) => s.id);
summary.first_has_next = first.hasNextPage();
summary.all = [];
for await (const s of knock.schedules.list({ workflow: "sdk-sched", page_size: 2 })) summary.all.push(s.id);
summary.other_workflow = (await knock.schedules.list({ workflow: "nothing-here" })).entries.length;

// Update one: new rules and data.
summary.updated = await knock.schedules.update({
  schedule_ids: [summary.created[0].id],
  repeats: [{ frequency: "daily", hours: 18 }],
  data: { digest: false },
});

// A user's schedules; the one-off fires and shows its last occurrence.
summary.sch2 = (await knock.users.listSchedules("sch-2")).entries;
summary.fired = await until("the one-off to fire", async () => {
  const page = await knock.users.listSchedules("sch-1", { workflow: "sdk-sched" });
  return page.entries.find((s) => s.id === summary.once.id && s.last_occurrence_at);
});

// Delete one.
summary.deleted = await knock.schedules.delete({ schedule_ids: [summary.created[1].id] });
summary.after_delete = (await knock.schedules.list({ workflow: "sdk-sched" })).entries.map((s) => s.id);

// Errors.
try {
  await knock.schedules.create({ workflow: "no-such-flow", recipients: ["sch-1"], repeats: [{ frequency: "daily" }] });
  summary.missing = "no error";
} catch (e) {
  if (!(e instanceof APIError)) throw e;
  summary.missing = { status: e.status, code: e.error?.code };
}
try {
  await knock.schedules.delete({ schedule_ids: ["00000000-0000-0000-0000-000000000000"] });
  summary.unknown_id = "no error";
} catch (e) {
  if (!(e instanceof APIError)) throw e;
  summary.unknown_id = { status: e.status, code: e.error?.code };
}

console.log(JSON.stringify(summary));

//! Capacity figures of the real `herald` binary on the local control plane,
//! side by side in one run: memory (idle, per cached User, per subscription),
//! subscriptions through the API from 8 parallel clients to one object, and a
//! fan-out to every subscriber through a fast local receiver (nginx): time
//! to the first delivery, deliveries per second and Kubernetes API writes
//! per recipient. Prints figures; asserts only that the work was done.
//!
//!     cargo bench --bench capacity
//!
//! Settings (environment): HERALD_BENCH_USERS (default 10,000) Users, each
//! subscribed to the object. Needs nginx (`apt-get install nginx-light`).
//! Uses the control plane the tests use (HERALD_TEST_KUBECONFIG, or one it
//! starts with scripts/controlplane.sh).

#[path = "../tests/common/mod.rs"]
mod common;

use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use herald::resources::{Channel, TriggerRun, User, Workflow};
use k8s_openapi::api::core::v1::Secret;
use kube::api::PostParams;
use kube::{Api, ResourceExt};
use serde_json::{json, Value};

/// nginx answering 200 to everything, logging each request's arrival time.
struct Nginx {
    child: Child,
    port: u16,
    log: PathBuf,
    dir: PathBuf,
}

impl Nginx {
    fn start() -> Nginx {
        let binary = ["/usr/sbin/nginx", "/usr/local/sbin/nginx"].into_iter().find(|p| std::path::Path::new(p).exists());
        let binary = binary.expect("this benchmark needs nginx as its fast receiver: apt-get install nginx-light");
        let dir = std::env::temp_dir().join(format!("herald-bench-nginx-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let log = dir.join("access.log");
        let conf = format!(
            "worker_processes 1; error_log {dir}/error.log; pid {dir}/nginx.pid; events {{ worker_connections 4096; }}
             http {{ log_format t '$msec'; access_log {log} t; client_body_temp_path {dir}; proxy_temp_path {dir}; fastcgi_temp_path {dir}; uwsgi_temp_path {dir}; scgi_temp_path {dir};
               server {{ listen 127.0.0.1:{port}; location / {{ return 200 'ok'; }} }} }}",
            dir = dir.display(),
            log = log.display()
        );
        std::fs::write(dir.join("nginx.conf"), conf).unwrap();
        let child = Command::new(binary).args(["-p", &dir.display().to_string(), "-c", "nginx.conf", "-g", "daemon off;"]).spawn().expect("starting nginx");
        Nginx { child, port, log, dir }
    }

    /// Arrival times (seconds since the epoch) of every request so far.
    fn arrivals(&self) -> Vec<f64> {
        std::fs::read_to_string(&self.log).unwrap_or_default().lines().filter_map(|l| l.trim().parse().ok()).collect()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok()).unwrap_or(0) * 1024
}

/// CPU seconds (user + system) a process has used so far; 0 when it is gone.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command's closing parenthesis; utime and stime are the 12th and 13th.
    let fields: Vec<&str> = stat.rsplit_once(')').map(|(_, rest)| rest.split_whitespace().collect()).unwrap_or_default();
    let ticks: u64 = [11, 12].iter().filter_map(|i| fields.get(*i)?.parse::<u64>().ok()).sum();
    // SAFETY: sysconf only reads a system constant.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1);
    ticks as f64 / per_second as f64
}

/// The processes whose CPU time a phase is split between: herald and the
/// control plane's apiserver and etcd (read from scripts/controlplane.sh's
/// pid files beside the kubeconfig, when there are some).
struct Processes {
    named: Vec<(&'static str, u32)>,
}

impl Processes {
    fn find(herald: u32) -> Processes {
        let mut named = vec![("herald", herald)];
        let dir = std::env::var("HERALD_TEST_KUBECONFIG").ok().and_then(|k| std::path::Path::new(&k).parent().map(|p| p.to_path_buf()));
        for (name, file) in [("apiserver", "apiserver.pid"), ("etcd", "etcd.pid")] {
            if let Some(pid) = dir.as_ref().and_then(|d| std::fs::read_to_string(d.join(file)).ok()).and_then(|p| p.trim().parse().ok()) {
                named.push((name, pid));
            }
        }
        Processes { named }
    }

    fn sample(&self) -> Vec<f64> {
        self.named.iter().map(|(_, pid)| cpu_seconds(*pid)).collect()
    }

    /// "herald 12.3 s, apiserver 45.6 s, ..." between two samples, with the wall time.
    fn spent(&self, before: &[f64], after: &[f64], wall: Duration) -> String {
        let parts: Vec<String> = self.named.iter().zip(before.iter().zip(after)).map(|((name, _), (b, a))| format!("{name} {:.1} s", a - b)).collect();
        format!("CPU {} in {:.1} s of wall time", parts.join(", "), wall.as_secs_f64())
    }
}

/// With HERALD_BENCH_PERF=DIR, a phase runs under `perf record` attached to
/// herald, writing DIR/<phase>.data (`perf report -i` it afterwards).
struct Profile(Option<Child>);

impl Profile {
    fn start(pid: u32, phase: &str) -> Profile {
        let Ok(dir) = std::env::var("HERALD_BENCH_PERF") else { return Profile(None) };
        let out = format!("{dir}/{phase}.data");
        let child = Command::new("perf")
            .args(["record", "-e", "cpu-clock", "-F", "199", "--call-graph", "dwarf,16384", "-o", &out, "-p", &pid.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("HERALD_BENCH_PERF needs perf (apt-get install linux-perf)");
        Profile(Some(child))
    }
}

impl Drop for Profile {
    fn drop(&mut self) {
        if let Some(child) = &mut self.0 {
            // perf writes its file on SIGINT.
            let _ = Command::new("kill").args(["-INT", &child.id().to_string()]).status();
            let _ = child.wait();
        }
    }
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

async fn create<K>(ns: &common::TestNamespace, value: Value) -> K
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope> + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
    <K as kube::Resource>::DynamicType: Default,
{
    ns.api::<K>().create(&PostParams::default(), &serde_json::from_value(value).expect("bench object")).await.expect("create")
}

/// Waits until herald's index holds `n` objects of `kind`.
async fn cached(herald: &common::HeraldProcess, kind: &str, n: usize) {
    common::wait_for(&format!("{n} {kind}s in herald's index"), Duration::from_secs(600), || async {
        let text = reqwest::get(format!("http://{}/metrics", herald.addr)).await.ok()?.text().await.ok()?;
        let line = format!("herald_cached_objects{{kind=\"{kind}\"}}");
        let value = text.lines().find(|l| l.starts_with(&line))?.rsplit(' ').next()?.parse::<f64>().ok()?;
        (value as usize >= n).then_some(())
    })
    .await;
}

async fn writes(herald: &common::HeraldProcess) -> f64 {
    herald.metric("herald_api_writes_total").await
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    runtime.block_on(bench());
}

async fn bench() {
    let users: usize = std::env::var("HERALD_BENCH_USERS").ok().and_then(|v| v.parse().ok()).unwrap_or(10_000);
    let client = common::client().await;
    let ns = common::TestNamespace::new(&client).await;
    let nginx = Nginx::start();
    let key = format!("sk_test_{}", uuid::Uuid::new_v4().simple());
    let secret: Secret = serde_json::from_value(json!({"metadata": {"name": "herald-api-key", "labels": {"herald.dev/api-key": "true"}}, "stringData": {"key": key}})).unwrap();
    Api::<Secret>::namespaced(client.clone(), &ns.name).create(&PostParams::default(), &secret).await.unwrap();
    create::<Channel>(
        &ns,
        json!({"apiVersion": "herald.dev/v1alpha1", "kind": "Channel", "metadata": {"name": "hooks"}, "spec": {"type": "http", "url": format!("http://127.0.0.1:{}/hook", nginx.port)}}),
    )
    .await;
    create::<Workflow>(
        &ns,
        json!({"apiVersion": "herald.dev/v1alpha1", "kind": "Workflow", "metadata": {"name": "fan"},
        "spec": {"steps": [{"ref": "notify", "type": "channel", "channel": "hooks", "template": {"body": "{\"to\": {{ recipient.id | json }}}"}}]}}),
    )
    .await;
    let herald = common::HeraldProcess::start(&ns.name, &[]);
    let pid = herald.child.id();
    let processes = Processes::find(pid);
    cached(&herald, "User", 0).await;
    let idle = rss_bytes(pid);

    // Memory per cached User.
    let ids: Vec<String> = (0..users).map(|i| format!("user_{i:06}")).collect();
    let api = ns.api::<User>();
    let started = Instant::now();
    // Created in two parts: the figure at 100,000 Users (the idle goal) is
    // read on the way when there are more.
    let checkpoint = users.min(100_000);
    let mut at_checkpoint = None;
    for part in [&ids[..checkpoint], &ids[checkpoint..]] {
        futures::stream::iter(part.iter())
            .for_each_concurrent(32, |id| {
                let api = api.clone();
                async move {
                    let user: User = serde_json::from_value(json!({"apiVersion": "herald.dev/v1alpha1", "kind": "User", "metadata": {"name": id.replace('_', "-")},
                        "spec": {"id": id, "name": format!("User {id}"), "email": format!("{id}@example.com"), "properties": {"plan": "pro"}}}))
                    .unwrap();
                    api.create(&PostParams::default(), &user).await.expect("create user");
                }
            })
            .await;
        if at_checkpoint.is_none() {
            cached(&herald, "User", checkpoint).await;
            at_checkpoint = Some(rss_bytes(pid));
        }
    }
    cached(&herald, "User", users).await;
    let with_users = rss_bytes(pid);
    let users_setup = started.elapsed();

    // Subscriptions through the API: 8 clients, 100 users a call, one object.
    let http = reqwest::Client::new();
    let base = format!("http://{}", herald.addr);
    let cpu_before_subscribing = processes.sample();
    let profile = Profile::start(pid, "subscribe");
    let started = Instant::now();
    let answers: Vec<u16> = futures::stream::iter(ids.chunks(100))
        .map(|chunk| {
            let (http, base, key) = (http.clone(), base.clone(), key.clone());
            async move {
                let body = json!({"recipients": chunk});
                let response = http
                    .post(format!("{base}/v1/objects/groups/everyone/subscriptions"))
                    .bearer_auth(&key)
                    .header("content-type", "application/json")
                    .body(body.to_string())
                    .send()
                    .await
                    .expect("subscribe");
                response.status().as_u16()
            }
        })
        .buffer_unordered(8)
        .collect()
        .await;
    let subscribe_time = started.elapsed();
    let subscribe_cpu = processes.spent(&cpu_before_subscribing, &processes.sample(), subscribe_time);
    drop(profile);
    let refused = answers.iter().filter(|s| **s != 200).count();
    cached(&herald, "MemberSlice", users.div_ceil(1000)).await;
    let with_subscriptions = rss_bytes(pid);

    // The fan-out: the object and every subscriber, to nginx.
    let writes_before = writes(&herald).await;
    let cpu_before_fanout = processes.sample();
    let profile = Profile::start(pid, "fanout");
    let triggered = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs_f64();
    let started = Instant::now();
    let run: TriggerRun = create(
        &ns,
        json!({"apiVersion": "herald.dev/v1alpha1", "kind": "TriggerRun", "metadata": {"generateName": "bench-"},
        "spec": {"workflow": "fan", "recipients": [{"id": "everyone", "collection": "groups"}]}}),
    )
    .await;
    let runs = ns.api::<TriggerRun>();
    // The highest RSS while the run goes, sampled.
    let sampling = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let sampler = {
        let sampling = sampling.clone();
        std::thread::spawn(move || {
            let mut peak = 0;
            while sampling.load(std::sync::atomic::Ordering::Relaxed) {
                peak = peak.max(rss_bytes(pid));
                std::thread::sleep(Duration::from_millis(20));
            }
            peak
        })
    };
    let done = common::wait_for("the fan-out to finish", Duration::from_secs(1800), || async {
        runs.get(&run.name_any()).await.ok().filter(|r| r.status.as_ref().is_some_and(|s| s.state.is_finished()))
    })
    .await;
    let elapsed = started.elapsed();
    let fanout_cpu = processes.spent(&cpu_before_fanout, &processes.sample(), elapsed);
    drop(profile);
    let writes_after = writes(&herald).await;
    let status = done.status.unwrap();
    let arrivals = nginx.arrivals();
    let recipients = users + 1;
    assert!(arrivals.len() >= recipients, "{} deliveries for {recipients} recipients", arrivals.len());
    let first = arrivals.iter().cloned().fold(f64::INFINITY, f64::min) - triggered;
    sampling.store(false, std::sync::atomic::Ordering::Relaxed);
    let peak = sampler.join().unwrap_or_default();

    println!("herald capacity, {users} Users (setup {:.0}s), release={}", users_setup.as_secs_f64(), !cfg!(debug_assertions));
    println!(
        "  memory: idle {:.1} MiB; {:.1} MiB with {checkpoint} Users; +{:.0} bytes per cached User; +{:.0} bytes per subscription; peak {:.1} MiB during the fan-out (+{:.1} MiB over before it)",
        mib(idle),
        mib(at_checkpoint.unwrap_or(with_users)),
        (with_users.saturating_sub(idle)) as f64 / users as f64,
        (with_subscriptions.saturating_sub(with_users)) as f64 / users as f64,
        mib(peak),
        mib(peak.saturating_sub(with_subscriptions))
    );
    println!(
        "  subscriptions: {users} through POST /v1/objects/{{c}}/{{id}}/subscriptions, 8 clients, 100 a call: {:.0}/s, {refused} of {} calls refused",
        users as f64 / subscribe_time.as_secs_f64(),
        answers.len()
    );
    println!("    {subscribe_cpu}");
    println!(
        "  fan-out to nginx: {recipients} recipients in {:.2}s: {:.0} deliveries/s; first delivery {:.0} ms after the trigger; {} pages; {:.0} API writes ({:.4} per recipient); run {:?}",
        elapsed.as_secs_f64(),
        arrivals.len() as f64 / elapsed.as_secs_f64(),
        first * 1000.0,
        status.pages.len(),
        writes_after - writes_before,
        (writes_after - writes_before) / recipients as f64,
        status.state
    );
    println!("    {fanout_cpu}");
}

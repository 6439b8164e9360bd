//! Delivery of rendered messages through their Channel: http and chat
//! webhooks, SMTP email.
//!
//! One call to [`Deliverer::deliver`] takes one message through every
//! attempt its Channel allows and returns the outcome that is recorded on
//! the recipient's step. The protocols live in [`crate::delivery`]; this
//! module finds the Channel and its Secret, prepares the request once, and
//! runs the attempts with backoff under the operator-wide concurrency bound,
//! whose slots are shared fairly among namespaces and runs ([`super::fair`]).

use std::sync::Arc;
use std::time::Instant;

use kube::Client;

use crate::core::execution::{DeliveryOutcome, Message};
use crate::core::functions::{FetchCall, FetchFailure, FetchOutcome};
use crate::core::status::AttemptRecord;
use crate::core::truncate;
use crate::delivery::config::{self, ChannelProblem, SmtpServer};
use crate::delivery::egress::EgressPolicy;
use crate::delivery::email::{self, Email, Transports};
use crate::delivery::http::{self, HttpClient, WebhookRequest};
use crate::delivery::retry::RetryPolicy;
use crate::delivery::secrets::{SecretCache, SecretData};
use crate::delivery::{DeliveryError, Failure, Sent};
use crate::resources::channel::{Channel, ChannelType};

/// The longest message kept on a recipient's step.
const MAX_STEP_MESSAGE: usize = 400;
/// A fetch step's attempts, each within the timeout (Knock's: 15 s), with backoff between them.
pub const FETCH_ATTEMPTS: u32 = 3;
pub const FETCH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(15);
const FETCH_BACKOFF: std::time::Duration = std::time::Duration::from_secs(1);
/// The largest fetch answer read (what is kept for later steps is smaller still).
const MAX_FETCH_BODY: usize = 1024 * 1024;

/// Sends messages through Channels.
pub struct Deliverer {
    channels: super::Cache<Channel>,
    secrets: SecretCache,
    /// Built once: its connection pool is shared by every delivery. An error
    /// (no TLS provider) fails http and chat deliveries with its message
    /// instead of stopping the operator.
    http: Result<HttpClient, String>,
    smtp: Transports,
    /// Which addresses deliveries may connect to (the HTTP client holds it too).
    egress: Arc<EgressPolicy>,
    /// Attempts in flight across every run (`--max-deliveries`). Taken per
    /// attempt and released during backoff, so that runs retrying against a
    /// failing receiver do not starve the others; handed out fairly by
    /// namespace, then by run, so that one namespace's huge or slow run does
    /// not delay another's.
    slots: Arc<super::fair::FairSlots>,
    /// Checked before every attempt: a replica that cannot confirm it leads sends nothing.
    fence: crate::leader::Fence,
}

/// What one message is, ready for attempts.
enum Prepared {
    Webhook(WebhookRequest),
    Email(Email, SmtpServer),
}

impl Deliverer {
    /// A deliverer reading Channels from `channels` and Secrets through
    /// `client`, with an attempt in flight for each of `slots`, connecting
    /// only where `egress` permits.
    pub fn new(client: Client, channels: super::Cache<Channel>, slots: Arc<super::fair::FairSlots>, fence: crate::leader::Fence, egress: EgressPolicy) -> Self {
        let egress = Arc::new(egress);
        Deliverer { fence, channels, secrets: SecretCache::new(client), http: http::client(egress.clone()), smtp: Transports::default(), egress, slots }
    }

    /// The Secret reads, shared with the Channel reconciler.
    pub fn secrets(&self) -> &SecretCache {
        &self.secrets
    }

    /// Delivers one message of `run` (a TriggerRun's name: its attempts wait
    /// for slots in that run's turn); the outcome is recorded on the recipient's step.
    /// Never panics on what templates rendered: a bad URL, header or address
    /// fails this recipient's step with a message saying which. `Err(Fenced)`:
    /// this replica's leadership could not be confirmed before an attempt, so
    /// nothing is to be recorded (the next leader delivers, with the same
    /// Idempotency-Key).
    pub async fn deliver(&self, namespace: &str, run: &str, message: &Message) -> Result<DeliveryOutcome, Fenced> {
        let started = Instant::now();
        let channel = self.channels.get(namespace, &message.channel);
        let Some(channel) = channel else {
            return Ok(failed("ChannelNotFound", format!("Channel `{}` does not exist", message.channel), 0, None));
        };
        let spec = &channel.spec;
        let smtp = match config::check_spec(spec) {
            Ok(s) => s,
            Err(problem) => return Ok(not_ready(&message.channel, &problem)),
        };
        let prepared = match (spec.channel_type, smtp) {
            (ChannelType::Http, _) => http::http_request(message, spec.url.as_deref()).map(Prepared::Webhook),
            (ChannelType::Chat, _) => http::chat_request(message, spec.url.as_deref()).map(Prepared::Webhook),
            (ChannelType::Email, Some(server)) => email::build(message, spec.from.as_deref()).map(|e| Prepared::Email(e, server)),
            (ChannelType::Email, None) => Err(DeliveryError::Channel(ChannelProblem::InvalidConfig("an email channel needs `smtp`".into()))),
            // Feed messages are stored by the run (controller::in_app), never sent.
            (ChannelType::InAppFeed, _) => Err(DeliveryError::Channel(ChannelProblem::InvalidConfig("an in_app_feed channel is not sent over the network".into()))),
        };
        let prepared = match prepared {
            Ok(p) => p,
            Err(e) => return Ok(outcome_of_error(&message.channel, &e, 0)),
        };
        // A missing Secret or key fails before any attempt (and says so with
        // attempts: 0); read errors that may pass are retried with the attempts.
        if let Err(e) = self.secret(namespace, &channel).await {
            if !e.is_retryable() {
                return Ok(outcome_of_error(&message.channel, &e, 0));
            }
        }
        let (policy, timeout) = config::limits(spec);
        let namespace = namespace.to_string();
        let channel_ref = &channel;
        let prepared = &prepared;
        let (result, attempts, history) = self
            .attempts(&namespace, run, &policy, |attempt| {
                let namespace = namespace.clone();
                async move {
                    let secret = self.secret(&namespace, channel_ref).await?;
                    tracing::debug!(channel = %message.channel, key = %message.idempotency_key, attempt, "delivery attempt");
                    match prepared {
                        Prepared::Webhook(request) => {
                            let client = self.http.as_ref().map_err(|e| DeliveryError::Transient(Failure::new(None, e.clone())))?;
                            let signing_key = secret.as_deref().and_then(|s| s.get(config::SIGNING_KEY));
                            http::send(client, request, signing_key, timeout).await
                        }
                        Prepared::Email(email, server) => {
                            email::check_egress(&self.egress, server).await?;
                            let credentials = secret.as_deref().and_then(|s| Some((s.text(config::USERNAME)?.to_string(), s.text(config::PASSWORD)?.to_string())));
                            let fingerprint = format!(
                                "{}/{}",
                                channel_ref.metadata.resource_version.as_deref().unwrap_or_default(),
                                secret.as_deref().map(|s| s.resource_version.as_str()).unwrap_or_default()
                            );
                            let transport = self.smtp.get((namespace.clone(), message.channel.clone()), &fingerprint, server, credentials, timeout)?;
                            email::send(&transport, email, server, timeout).await
                        }
                    }
                }
            })
            .await?;
        let elapsed = started.elapsed();
        Ok(match result {
            Ok(sent) => {
                let retried = if attempts > 1 { format!(" after {attempts} attempts") } else { String::new() };
                DeliveryOutcome {
                    ok: true,
                    reason: "Delivered".into(),
                    message: truncate(&format!("{}{retried} ({} ms)", sent.summary, elapsed.as_millis()), MAX_STEP_MESSAGE),
                    attempts: attempts as i32,
                    status_code: sent.status,
                    history,
                }
            }
            Err(e) => {
                tracing::info!(channel = %message.channel, key = %message.idempotency_key, attempts, error = %e, "delivery failed");
                DeliveryOutcome { history, ..outcome_of_error(&message.channel, &e, attempts) }
            }
        })
    }

    /// Makes a fetch step's request: up to [`FETCH_ATTEMPTS`] attempts of at
    /// most [`FETCH_TIMEOUT`] each, retrying 5xx answers and timeouts with
    /// backoff; the answer must be JSON (or empty). The egress policy and the
    /// delivery slots apply as for deliveries.
    pub async fn fetch(&self, namespace: &str, run: &str, call: &FetchCall) -> Result<FetchOutcome, Fenced> {
        let fail = |reason: &str, message: String, attempts: u32, status_code: Option<i32>| FetchOutcome {
            result: Err(FetchFailure { reason: reason.into(), message: truncate(&message, MAX_STEP_MESSAGE) }),
            attempts: attempts as i32,
            status_code,
        };
        let request = match http::fetch_request(call) {
            Ok(r) => r,
            Err(e) => return Ok(fail(e.reason(), e.to_string(), 0, None)),
        };
        let signing_key = match &call.secret {
            None => None,
            Some(name) => match self.secrets.get(namespace, name).await {
                Ok(Some(secret)) => match secret.get(config::SIGNING_KEY) {
                    Some(key) => Some(key.to_vec()),
                    None => return Ok(fail("SecretKeyMissing", format!("Secret `{name}` has no `{}`", config::SIGNING_KEY), 0, None)),
                },
                Ok(None) => return Ok(fail("SecretNotFound", format!("Secret `{name}` does not exist"), 0, None)),
                Err(e) => return Ok(fail("SecretUnreadable", format!("reading Secret `{name}`: {e}"), 0, None)),
            },
        };
        let policy = RetryPolicy { max_attempts: FETCH_ATTEMPTS, initial_backoff: FETCH_BACKOFF };
        let body = std::sync::Mutex::new(Vec::new());
        let (result, attempts, _) = self
            .attempts(namespace, run, &policy, |_| async {
                let client = self.http.as_ref().map_err(|e| DeliveryError::Transient(Failure::new(None, e.clone())))?;
                let (code, bytes) = http::fetch(client, &request, signing_key.as_deref(), FETCH_TIMEOUT, MAX_FETCH_BODY).await?;
                *body.lock().unwrap_or_else(|p| p.into_inner()) = bytes;
                Ok(Sent { status: Some(code), summary: String::new() })
            })
            .await?;
        let body = body.into_inner().unwrap_or_else(|p| p.into_inner());
        Ok(match result {
            Ok(sent) if body.iter().all(u8::is_ascii_whitespace) => FetchOutcome { result: Ok(None), attempts: attempts as i32, status_code: sent.status },
            Ok(sent) => match serde_json::from_slice::<serde_json::Value>(&body) {
                Ok(answer) => FetchOutcome { result: Ok(Some(answer)), attempts: attempts as i32, status_code: sent.status },
                Err(e) => fail("InvalidResponse", format!("the answer from {} is not JSON: {e}", request.preview), attempts, sent.status),
            },
            Err(e) => {
                let reason = match &e {
                    DeliveryError::Rejected(_) | DeliveryError::Transient(_) if e.status_code().is_some() => "HttpStatus",
                    DeliveryError::Transient(_) => "RequestFailed",
                    other => other.reason(),
                };
                let reason = e.status_code().map(|c| format!("{reason}{c}")).unwrap_or_else(|| reason.to_string());
                fail(&reason, format!("{} after {attempts} attempt(s): {e}", request.preview), attempts, e.status_code())
            }
        })
    }

    /// The Channel's Secret, when it references one, checked for the keys
    /// its type needs. Read errors may pass (another attempt reads again);
    /// a missing Secret or key does not.
    async fn secret(&self, namespace: &str, channel: &Channel) -> Result<Option<Arc<SecretData>>, DeliveryError> {
        let Some(reference) = &channel.spec.secret_ref else { return Ok(None) };
        let lookup = self.secrets.get(namespace, &reference.name).await.map_err(|e| match &e {
            kube::Error::Api(s) if s.code == 403 => DeliveryError::Channel(ChannelProblem::SecretUnreadable { secret: reference.name.clone(), message: s.message.clone() }),
            _ => DeliveryError::Transient(Failure::new(None, format!("reading Secret `{}`: {e}", reference.name))),
        })?;
        config::check_secret(&channel.spec, &reference.name, lookup.as_deref())?;
        Ok(lookup)
    }

    /// Runs `attempt` until it succeeds, fails for good, or the policy's
    /// attempts are used up, each with a slot of `namespace`'s `run`; returns
    /// the last result, the attempts made and a record of each.
    async fn attempts<F, Fut>(&self, namespace: &str, run: &str, policy: &RetryPolicy, mut attempt: F) -> Result<(Result<Sent, DeliveryError>, u32, Vec<AttemptRecord>), Fenced>
    where
        F: FnMut(u32) -> Fut,
        Fut: std::future::Future<Output = Result<Sent, DeliveryError>>,
    {
        let mut n = 0;
        let mut history = Vec::new();
        loop {
            n += 1;
            let started = k8s_openapi::jiff::Timestamp::now();
            let result = {
                // The delivery pool is never closed; were it, attempts would go on unbounded.
                let _slot = self.slots.acquire(namespace, run).await;
                // Checked after waiting for a slot, just before sending.
                if !self.fence.holds() {
                    return Err(Fenced);
                }
                attempt(n).await
            };
            history.push(AttemptRecord {
                attempt: n as i32,
                time: started.to_string(),
                status_code: match &result {
                    Ok(sent) => sent.status,
                    Err(e) => e.status_code(),
                },
                error: result.as_ref().err().map(|e| truncate(&e.to_string(), 200)),
            });
            match result {
                Err(e) if e.is_retryable() && n < policy.max_attempts => {
                    let wait = policy.wait(n, e.retry_after());
                    tracing::debug!(attempt = n, error = %e, wait_ms = wait.as_millis() as u64, "delivery attempt failed; retrying");
                    tokio::time::sleep(wait).await;
                }
                other => return Ok((other, n, history)),
            }
        }
    }
}

/// This replica could not confirm that it still leads: nothing was sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fenced;

fn failed(reason: &str, message: String, attempts: u32, status_code: Option<i32>) -> DeliveryOutcome {
    DeliveryOutcome { ok: false, reason: reason.into(), message: truncate(&message, MAX_STEP_MESSAGE), attempts: attempts as i32, status_code, history: Vec::new() }
}

fn not_ready(channel: &str, problem: &ChannelProblem) -> DeliveryOutcome {
    failed("ChannelNotReady", format!("Channel `{channel}` is not ready: {problem}"), 0, None)
}

fn outcome_of_error(channel: &str, e: &DeliveryError, attempts: u32) -> DeliveryOutcome {
    match e {
        DeliveryError::Channel(problem) => DeliveryOutcome { attempts: attempts as i32, ..not_ready(channel, problem) },
        DeliveryError::Transient(f) => failed(e.reason(), format!("gave up after {attempts} attempts: {}", f.message), attempts, f.status),
        _ => failed(e.reason(), e.to_string(), attempts, e.status_code()),
    }
}

//! CPU-bound work (rendering templates) inside a reconcile, kept off the
//! async workers.
//!
//! A render may take up to its budget (see `core::templates::budget`), and
//! a recipient's step renders several fields; on an async worker thread that
//! time would stall every other task the worker holds (other runs, the
//! API, watches). [`tokio::task::block_in_place`] instead hands the worker's
//! other tasks to another thread while this one renders. It needs the
//! multi-threaded runtime (`herald run` has it); on a current-thread runtime
//! (tests embedding the operator in `#[tokio::test]`) it would panic, and
//! there is no other worker to protect, so the work runs in place.
//! `spawn_blocking` would need `'static` data, i.e. a copy of the run's
//! context for every recipient.

use tokio::runtime::{Handle, RuntimeFlavor};

/// Runs `work` without stalling the other tasks of the async runtime.
pub fn off_the_async_workers<T>(work: impl FnOnce() -> T) -> T {
    match Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(RuntimeFlavor::MultiThread) => tokio::task::block_in_place(work),
        _ => work(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_in_place_without_a_runtime() {
        assert_eq!(off_the_async_workers(|| 1 + 1), 2);
    }

    #[tokio::test]
    async fn runs_in_place_on_a_current_thread_runtime() {
        assert_eq!(off_the_async_workers(|| 2 + 2), 4);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn a_busy_task_leaves_the_worker_to_the_others() {
        // One worker, held by a task that waits for another task it spawned:
        // only if the worker is handed over can the other task run.
        let busy = tokio::spawn(async {
            let (tx, rx) = std::sync::mpsc::channel::<()>();
            let other = tokio::spawn(async move { tx.send(()).unwrap() });
            let waited = off_the_async_workers(|| rx.recv_timeout(std::time::Duration::from_secs(30)));
            (waited, other)
        });
        let (waited, other) = busy.await.unwrap();
        assert!(waited.is_ok(), "the other task ran while this one was busy");
        other.await.unwrap();
    }
}

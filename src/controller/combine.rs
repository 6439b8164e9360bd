//! Combining concurrent changes to one thing into one write.
//!
//! Callers submit a change; whoever becomes the writer takes every change
//! queued so far and writes them together, then answers each caller. Eight
//! clients subscribing to one object thus cost about one write per round,
//! not eight competing ones.

use std::future::Future;
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

/// Changes of type `C` waiting to be written; each caller gets an `O`.
pub struct Combiner<C, O> {
    pending: Mutex<Vec<(C, oneshot::Sender<O>)>>,
    /// Held while a round is written, so rounds of one thing never overlap.
    writer: Arc<tokio::sync::Mutex<()>>,
}

impl<C, O> Default for Combiner<C, O> {
    fn default() -> Self {
        Combiner { pending: Mutex::new(Vec::new()), writer: Arc::default() }
    }
}

impl<C: Send + 'static, O: Send + 'static> Combiner<C, O> {
    /// Queues `change` and returns its outcome. If nobody is writing, this
    /// caller starts a round: `write` gets every change queued (this one
    /// among them) and returns one outcome per change, in order. A caller
    /// whose change another round took just waits for that round's answer
    /// (a caller waiting for a turn at writing instead would answer
    /// later callers one round behind, so every round would carry a single
    /// change). The round runs on its own task, to the end even if this
    /// caller goes away: the other callers' answers depend on it. None: the
    /// round that took this change failed before answering.
    pub async fn submit<W, F>(&self, change: C, write: W) -> Option<O>
    where
        W: FnOnce(Vec<C>) -> F,
        F: Future<Output = Vec<O>> + Send + 'static,
    {
        let (done, mut answer) = oneshot::channel();
        self.pending.lock().unwrap_or_else(|e| e.into_inner()).push((change, done));
        tokio::select! {
            biased;
            outcome = &mut answer => return outcome.ok(),
            writing = self.writer.clone().lock_owned() => {
                // Empty: an earlier round took this change (its answer is on the way).
                let batch = std::mem::take(&mut *self.pending.lock().unwrap_or_else(|e| e.into_inner()));
                if !batch.is_empty() {
                    let (changes, answers): (Vec<C>, Vec<_>) = batch.into_iter().unzip();
                    let round = write(changes);
                    tokio::spawn(async move {
                        let _writing = writing;
                        for (answer, outcome) in answers.into_iter().zip(round.await) {
                            let _ = answer.send(outcome);
                        }
                    });
                }
            }
        }
        answer.await.ok()
    }

    /// Whether no change is waiting.
    pub fn is_idle(&self) -> bool {
        self.pending.lock().unwrap_or_else(|e| e.into_inner()).is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::sync::mpsc;

    /// A writer the test drives: each round reports its changes and waits
    /// for the test to let it finish.
    /// A round's changes, and how the test lets it finish.
    type Started = (Vec<u32>, oneshot::Sender<()>);

    struct Rounds {
        started: mpsc::UnboundedSender<Started>,
    }

    impl Rounds {
        fn new() -> (Arc<Rounds>, mpsc::UnboundedReceiver<Started>) {
            let (started, rounds) = mpsc::unbounded_channel();
            (Arc::new(Rounds { started }), rounds)
        }

        async fn write(&self, changes: Vec<u32>) -> Vec<u32> {
            let (finish, finished) = oneshot::channel();
            self.started.send((changes.clone(), finish)).unwrap();
            let _ = finished.await;
            changes
        }
    }

    fn submit(combiner: &Arc<Combiner<u32, u32>>, rounds: &Arc<Rounds>, change: u32) -> tokio::task::JoinHandle<Option<u32>> {
        let (combiner, rounds) = (combiner.clone(), rounds.clone());
        tokio::spawn(async move { combiner.submit(change, |changes| async move { rounds.write(changes).await }).await })
    }

    /// Lets the spawned callers queue their changes (they do so before their first wait).
    async fn settle() {
        for _ in 0..50 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test]
    async fn changes_queued_during_a_round_are_written_together_in_the_next() {
        let combiner = Arc::new(Combiner::default());
        let (writer, mut rounds) = Rounds::new();
        let first = submit(&combiner, &writer, 1);
        let (changes, finish) = rounds.recv().await.unwrap();
        assert_eq!(changes, vec![1]);
        let waiting: Vec<_> = (2..=8).map(|c| submit(&combiner, &writer, c)).collect();
        settle().await;
        finish.send(()).unwrap();
        assert_eq!(first.await.unwrap(), Some(1));
        let (changes, finish) = rounds.recv().await.unwrap();
        assert_eq!(changes, (2..=8).collect::<Vec<_>>());
        finish.send(()).unwrap();
        for (call, change) in waiting.into_iter().zip(2..) {
            assert_eq!(call.await.unwrap(), Some(change));
        }
        assert!(combiner.is_idle());
    }

    /// A caller whose change was written is answered when that round ends,
    /// not held until it has taken a turn as writer for changes queued later
    /// (which made every round write a single change under steady load).
    #[tokio::test]
    async fn a_caller_is_answered_when_its_round_ends_not_after_later_rounds() {
        let combiner = Arc::new(Combiner::default());
        let (writer, mut rounds) = Rounds::new();
        let _first = submit(&combiner, &writer, 1);
        let (_, finish_first) = rounds.recv().await.unwrap();
        let second: Vec<_> = (2..=4).map(|c| submit(&combiner, &writer, c)).collect();
        settle().await;
        finish_first.send(()).unwrap();
        let (changes, finish_second) = rounds.recv().await.unwrap();
        assert_eq!(changes, vec![2, 3, 4]);
        // While the second round is being written, another change arrives.
        let third = submit(&combiner, &writer, 5);
        settle().await;
        finish_second.send(()).unwrap();
        // Its round starts; every caller of the second round is answered meanwhile.
        let (changes, finish_third) = tokio::time::timeout(Duration::from_secs(5), rounds.recv()).await.expect("a third round").unwrap();
        assert_eq!(changes, vec![5]);
        for (call, change) in second.into_iter().zip(2..) {
            let answered = tokio::time::timeout(Duration::from_secs(5), call).await.expect("answered while a later round is written");
            assert_eq!(answered.unwrap(), Some(change));
        }
        finish_third.send(()).unwrap();
        assert_eq!(third.await.unwrap(), Some(5));
    }

    #[tokio::test]
    async fn a_writer_that_goes_away_mid_round_still_answers_the_changes_it_took() {
        let combiner: Arc<Combiner<u32, u32>> = Arc::new(Combiner::default());
        let (writer, mut rounds) = Rounds::new();
        let first = submit(&combiner, &writer, 1);
        let (_, finish_first) = rounds.recv().await.unwrap();
        let second = submit(&combiner, &writer, 2);
        let third = submit(&combiner, &writer, 3);
        settle().await;
        finish_first.send(()).unwrap();
        assert_eq!(first.await.unwrap(), Some(1));
        let (changes, finish_second) = rounds.recv().await.unwrap();
        assert_eq!(changes, vec![2, 3]);
        // The caller writing the round goes away (its client hung up).
        second.abort();
        settle().await;
        let _ = finish_second.send(());
        let answered = tokio::time::timeout(Duration::from_secs(5), third).await.expect("answered");
        assert_eq!(answered.unwrap(), Some(3));
    }
}

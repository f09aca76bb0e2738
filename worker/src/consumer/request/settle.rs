//! Settling a served request: the commit when its offset can move, a done marker when an earlier
//! offset still runs, the transaction under exactly-once, and the store entries of committed requests.

use super::*;

impl Inner {
    /// Exactly-once delivery: commits the request's records with its offset in its transaction
    /// ([`transaction`]), then deletes its store entries. A request told to suspend before its
    /// turn keeps a plain answer as a done marker for the partition's next owner. Returns how
    /// it ended.
    pub(super) async fn settle_in_transaction(
        &self,
        txns: &Transactions,
        scope: &Scope,
        tp: &TopicPartition,
        offset: i64,
        epoch: u64,
        prefix: Option<String>,
    ) -> Result<Settled, WorkerError> {
        let settled = txns.commit(scope, &self.consumer).await?;
        match settled {
            Settled::Committed => {
                let prefixes = match self.inflight.finish(tp, offset, epoch, prefix.as_deref()) {
                    Some((_, prefixes)) => prefixes,
                    // Revoked since the commit: its entries are still the committed request's.
                    None => prefix.into_iter().collect(),
                };
                self.delete_all(prefixes).await;
            }
            Settled::Suspended => {
                if let Some(answer) = scope.answer_only().await {
                    self.keep_done(prefix.as_deref(), Some(&answer)).await;
                }
                self.ops.metrics.request_settled(RequestOutcome::Suspended);
            }
        }
        Ok(settled)
    }

    /// The answer of this task's transaction, when it published nothing else (exactly-once).
    pub(super) async fn answer_only(&self) -> Option<Vec<u8>> {
        match transaction::current() {
            Some(scope) => scope.answer_only().await,
            None => None,
        }
    }

    /// Commits past an answered offset when everything below it is finished; otherwise keeps
    /// its answer as a done marker, for a redelivery to publish again.
    pub(super) async fn settle_answered(
        &self,
        tp: &TopicPartition,
        offset: i64,
        epoch: u64,
        prefix: Option<String>,
        reply: Option<Vec<u8>>,
    ) {
        match self.inflight.finish(tp, offset, epoch, prefix.as_deref()) {
            Some((position, prefixes)) => {
                if self.commit(tp, epoch, position) {
                    self.delete_all(prefixes).await;
                } else {
                    // The group refuses commits while it rebalances: keep the answer as a done
                    // marker, in case the partition moves, and retry the commit from the loop.
                    self.keep_done(prefix.as_deref(), reply.as_deref()).await;
                    self.inflight.defer(tp, epoch, position, prefixes);
                }
            }
            None => self.keep_done(prefix.as_deref(), reply.as_deref()).await,
        }
    }

    pub(super) async fn keep_done(&self, prefix: Option<&str>, reply: Option<&[u8]>) {
        if let (Some(prefix), Some(reply)) = (prefix, reply) {
            match self.snapshots.put_done(prefix, reply).await {
                Ok(true) => info!("answered, not yet committable: done marker kept until the commit passes it"),
                Ok(false) => {}
                // The store logs its failures, at most once per interval.
                Err(e) => debug!(error = %e, "cannot keep a done marker; a redelivery would compute the answer again"),
            }
        }
    }

    /// Deletes the store entries of committed requests.
    pub async fn delete_all(&self, prefixes: Vec<String>) {
        for p in prefixes {
            self.snapshots.delete(&p).await;
        }
    }

    /// Retries the commits that failed, from the loop.
    pub async fn retry_deferred(&self) {
        for (tp, epoch, position, prefixes) in self.inflight.take_deferred() {
            if self.commit(&tp, epoch, position) {
                info!(topic = %tp.0, partition = tp.1, position, "deferred commit made");
                self.delete_all(prefixes).await;
            } else {
                self.inflight.defer(&tp, epoch, position, prefixes);
            }
        }
    }
}

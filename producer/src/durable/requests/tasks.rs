//! The client's background tasks: the reply reader, the offset committer and the deadline
//! timer, each feeding the decisions of [`super::Shared`].

use super::*;

/// Reads the reply topic until the client stops, routing each message.
pub(in crate::durable) async fn read_replies(shared: Arc<Shared>, consumer: Arc<ReplyConsumer>, partitions: usize) {
    let mut at_end = HashSet::new();
    let mut writes = FuturesUnordered::new();
    loop {
        tokio::select! {
            Some(()) = writes.next(), if !writes.is_empty() => {}
            // `recv` sleeps until librdkafka's queue-non-empty callback wakes it, and rdkafka
            // itself re-polls only every half `max.poll.interval.ms` (150 s). Belt and braces: a
            // wake-up lost in that chain costs at most this interval instead.
            () = tokio::time::sleep(REPOLL_INTERVAL) => {}
            message = consumer.recv() => match message {
                Ok(message) => {
                    let finishing = shared.on_message(message.partition(), message.offset(), message.key(), message.payload());
                    if let Some(finishing) = finishing {
                        let shared = Arc::clone(&shared);
                        writes.push(async move { shared.finish(finishing).await });
                    }
                }
                Err(KafkaError::PartitionEOF(partition)) => {
                    if at_end.insert(partition) && at_end.len() >= partitions {
                        debug!("reply topic read to its end");
                        shared.caught_up.send_replace(true);
                    }
                }
                // librdkafka retries transient trouble by itself; keep reading.
                Err(error) => warn!(%error, "error while reading replies; still reading"),
            },
        }
        if shared.lock().stopped.is_some() {
            return;
        }
    }
}

/// Commits the tracker's positions every commit interval, when they have moved.
pub(in crate::durable) async fn commit_positions(
    shared: Arc<Shared>,
    consumer: Arc<ReplyConsumer>,
    mut committed: HashMap<i32, i64>,
) {
    let mut ticker = tokio::time::interval(shared.options.commit_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let moved: Vec<(i32, i64)> = {
            let state = shared.lock();
            if state.stopped.is_some() {
                return;
            }
            state
                .commits
                .positions()
                .into_iter()
                .filter(|(partition, offset)| committed.get(partition) != Some(offset))
                .collect()
        };
        if moved.is_empty() {
            continue;
        }
        match replies::commit(&consumer, &shared.options.reply_topic, &moved, None).await {
            Ok(()) => committed.extend(moved),
            Err(error) => warn!(error = %error, "could not commit the caller's reply positions; retrying"),
        }
    }
}

/// Expires open requests at their deadlines, once the reply topic has been read to its end.
pub(in crate::durable) async fn expire_deadlines(shared: Arc<Shared>) {
    let mut caught_up = shared.caught_up.subscribe();
    if caught_up.wait_for(|caught_up| *caught_up).await.is_err() {
        return;
    }
    loop {
        let (due, next) = shared.expire_due(now_ms());
        for finishing in due {
            shared.finish(finishing).await;
        }
        if shared.lock().stopped.is_some() {
            return;
        }
        let wait = next.map_or(IDLE_WAKE, |deadline| {
            Duration::from_millis(u64::try_from(deadline.saturating_sub(now_ms())).unwrap_or(0)).min(IDLE_WAKE)
        });
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = shared.deadlines.notified() => {}
        }
    }
}

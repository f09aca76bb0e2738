#!/usr/bin/env python3
"""A durable Ferry caller in Python: send a fan-out of requests, survive being killed, and
collect every answer after a restart, without sending finished work again.

It speaks the same protocol as `ferry request --identity` (Rust: `producer/src/durable/`), so
the two can take over from each other; the tests kill one and resume with the other. Needs
`confluent-kafka` (tested with 2.12.1: `pip install confluent-kafka==2.12.1`).

    durable_fanout.py --bootstrap-servers HOST:PORT --identity orchestrator-0 --fan-out requests.jsonl
    durable_fanout.py --bootstrap-servers HOST:PORT --identity orchestrator-0 --resume

Each outcome is printed on stdout as one JSON line as it comes (the reply, or
`{"kind": "expired", ...}`); each request recovered from the journal is reported on stderr as
`durable_fanout: recovered <id> <state>`. Exit status: 0 if every outcome is a response, 3 if
any is an error reply, else 4 if any expired.

The protocol
------------

Identity: a name stable across restarts (`[A-Za-z0-9._-]`), such as the pod name; one process
per identity at a time.

Journal: a compacted topic (default `ferry.callers`). Records are keyed `<identity>/<request id>`
and written to ONE partition per identity: the 32-bit FNV-1a hash of the identity's UTF-8 bytes
modulo the topic's partition count (`journal_partition` below). The value is JSON:

    {"version": 1, "state": "sending" | "sent" | "answered" | "expired",
     "topic": <request topic>, "deadline_ms": <unix ms>, "request": {...}, "reply": {...}?}

`sending` is written (and acknowledged) BEFORE the request is published, `sent` after the broker
acknowledged the request, `answered` (with the final reply) when the reply is read, `expired` when
the deadline passes first; a tombstone (no value) once the application has the outcome. On start,
the identity's partition is read from the beginning to its end; the last record of each key wins.

Replies: every request names the caller's reply topic in `reply_to`. The caller assigns itself
every partition of it at the committed offsets of the group `ferry-caller.<identity>` (it never
subscribes, so a dead predecessor's session is no obstacle) and commits by hand, never past a
reply it still needs: a final reply until its `answered` record is acknowledged, the first chunk
of a streamed answer until the request is finished. A partition with no committed offset starts
at its end (at its beginning if the journal already has open requests) and that start is
committed at once, before any request is sent.

Restart: `sending` requests are published again (nobody knows if the broker got them), `sent`
ones are awaited, `answered` and `expired` ones are handed over at once. Deadlines are checked
only after the reply topic has been read to its end, so an answer that came in time wins.

Delivery contract: an outcome is handed over at least once until it is acknowledged (here: after
its line is printed and flushed). Chunks: keep the highest `seq` per request and append a chunk's
text only when its seq is higher; the final response is authoritative.

This example is single-threaded and waits for each journal write (a flush per step), which is
simple to follow and slow; the Rust client pipelines them.
"""

import argparse
import json
import re
import sys
import time
import uuid
from datetime import datetime

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

ENTRY_VERSION = 1
TIMEOUT = 30.0  # seconds for one Kafka call
COMMIT_INTERVAL = 0.2


def log(message):
    print(f"durable_fanout: {message}", file=sys.stderr, flush=True)


def fnv1a32(data: bytes) -> int:
    h = 0x811C9DC5
    for byte in data:
        h = ((h ^ byte) * 0x01000193) & 0xFFFFFFFF
    return h


def journal_partition(identity: str, partitions: int) -> int:
    return fnv1a32(identity.encode("utf-8")) % max(partitions, 1)


def now_ms() -> int:
    return int(time.time() * 1000)


def parse_duration(text: str) -> float:
    """`300s`, `2m`, `500ms` or plain seconds."""
    match = re.fullmatch(r"\s*([0-9.]+)\s*(ms|s|m|h)?\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r}")
    value, unit = float(match.group(1)), match.group(2) or "s"
    return value * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]


def ensure_journal_topic(conf, topic, partitions):
    """Creates the compacted journal topic if it is missing; returns its partition count. The
    embedded `ferry broker` (librdkafka's mock cluster) has no CreateTopics: there a producer's
    metadata request creates the topic instead."""
    admin = AdminClient(conf)
    metadata = admin.list_topics(timeout=TIMEOUT)
    if topic not in metadata.topics:
        if (metadata.cluster_id or "").startswith("mockCluster"):
            Producer(conf).list_topics(topic, timeout=TIMEOUT)
        else:
            new = NewTopic(topic, partitions, config={"cleanup.policy": "compact"})
            for future in admin.create_topics([new], request_timeout=TIMEOUT).values():
                try:
                    future.result()
                except Exception as error:  # an existing topic is fine
                    if error.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                        raise
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        found = admin.list_topics(topic, timeout=TIMEOUT).topics.get(topic)
        if found and found.error is None and found.partitions:
            return len(found.partitions)
        time.sleep(0.1)
    raise RuntimeError(f"journal topic {topic} is not ready")


# What a broker answers for a partition whose leader is still being elected or moved.
LEADER_ERRORS = (
    KafkaError.NOT_LEADER_FOR_PARTITION,
    KafkaError.LEADER_NOT_AVAILABLE,
    KafkaError.UNKNOWN_TOPIC_OR_PART,
)


def watermarks(consumer, topic, partition):
    """The partition's low and high offsets, retrying the errors a broker gives while a new
    topic's leader is being elected (NOT_LEADER_FOR_PARTITION, for one) until TIMEOUT."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        try:
            return consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=TIMEOUT)
        except KafkaException as e:
            error = e.args[0] if e.args else None
            transient = isinstance(error, KafkaError) and (error.retriable() or error.code() in LEADER_ERRORS)
            if not transient or time.monotonic() >= deadline:
                raise
            time.sleep(0.2)


def read_journal(conf, topic, partition, identity):
    """The identity's entries by request id: the partition folded from the beginning."""
    consumer = Consumer(
        {
            **conf,
            "group.id": f"ferry-journal-reader-{uuid.uuid4()}",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
        }
    )
    entries = {}
    low, high = watermarks(consumer, topic, partition)
    if high > low:
        consumer.assign([TopicPartition(topic, partition, OFFSET_BEGINNING)])
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            message = consumer.poll(0.1)
            if message is None:
                continue
            if message.error():
                if message.error().code() == KafkaError._PARTITION_EOF:
                    break
                continue
            key = (message.key() or b"").decode("utf-8", "replace")
            prefix = identity + "/"
            if key.startswith(prefix):
                request_id = key[len(prefix):]
                if message.value() is None:
                    entries.pop(request_id, None)
                else:
                    try:
                        entry = json.loads(message.value())
                        if entry.get("version") == ENTRY_VERSION and entry["request"]["id"] == request_id:
                            entries[request_id] = entry
                    except (ValueError, KeyError, TypeError):
                        log(f"skipping an unreadable journal record for {request_id}")
            if message.offset() + 1 >= high:
                break
        else:
            raise RuntimeError(f"could not read journal partition {topic}/{partition} in time")
    consumer.close()
    return entries


class Journal:
    """Writes one identity's records to its partition and waits for each batch to be acknowledged."""

    def __init__(self, conf, topic, partition, identity):
        self.producer = Producer({**conf, "enable.idempotence": True, "linger.ms": 0})
        self.topic, self.partition, self.identity = topic, partition, identity
        self.failures = []

    def _delivered(self, error, _message):
        if error is not None:
            self.failures.append(error)

    def write(self, request_id, entry):
        """Queues a record (a tombstone when `entry` is None); `confirm` waits for it."""
        value = None if entry is None else json.dumps(entry).encode("utf-8")
        self.producer.produce(
            self.topic,
            key=f"{self.identity}/{request_id}".encode("utf-8"),
            value=value,
            partition=self.partition,
            on_delivery=self._delivered,
        )

    def confirm(self):
        if self.producer.flush(TIMEOUT) != 0 or self.failures:
            raise RuntimeError(f"the journal did not take a record: {self.failures}")


class Positions:
    """Where the group may commit: the lowest held offset, or one past the last one read."""

    def __init__(self, starts):
        self.next = dict(starts)
        self.held = {partition: set() for partition in starts}

    def read(self, partition, offset, hold):
        self.next[partition] = max(self.next.get(partition, offset), offset + 1)
        if hold:
            self.held.setdefault(partition, set()).add(offset)

    def release(self, partition, offset):
        self.held.get(partition, set()).discard(offset)

    def positions(self):
        return {p: min([self.next[p], *self.held.get(p, ())]) for p in self.next}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bootstrap-servers", default="localhost:9092")
    parser.add_argument("--topic", default="ferry.requests", help="request topic")
    parser.add_argument("--reply-topic", default="ferry.replies")
    parser.add_argument("--journal-topic", default="ferry.callers")
    parser.add_argument("--identity", required=True)
    parser.add_argument("--timeout", type=parse_duration, default=120.0, help="for requests without a deadline")
    body = parser.add_mutually_exclusive_group(required=True)
    body.add_argument("--fan-out", metavar="FILE", help="JSON lines, one request each")
    body.add_argument("--resume", action="store_true", help="send nothing; collect what is open")
    args = parser.parse_args()
    if not re.fullmatch(r"[A-Za-z0-9._-]{1,200}", args.identity):
        parser.error("--identity may contain only ASCII letters, digits, '.', '_' and '-'")

    conf = {"bootstrap.servers": args.bootstrap_servers}
    identity = args.identity
    partitions = ensure_journal_topic(conf, args.journal_topic, 3)
    partition = journal_partition(identity, partitions)
    entries = read_journal(conf, args.journal_topic, partition, identity)
    journal = Journal(conf, args.journal_topic, partition, identity)
    for request_id, entry in sorted(entries.items()):
        log(f"recovered {request_id} {entry['state']}")

    # The reply consumer, at the group's committed offsets (see the module docs).
    replies = Consumer(
        {
            **conf,
            "group.id": f"ferry-caller.{identity}",
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": "earliest",
            "enable.partition.eof": True,
            "fetch.wait.max.ms": 100,
        }
    )
    reply_partitions = sorted(replies.list_topics(args.reply_topic, timeout=TIMEOUT).topics[args.reply_topic].partitions)
    has_open = any(e["state"] in ("sending", "sent") for e in entries.values())
    starts, to_commit = {}, []
    asked = [TopicPartition(args.reply_topic, p) for p in reply_partitions]
    for tp in replies.committed(asked, timeout=TIMEOUT):
        if tp.offset >= 0:
            starts[tp.partition] = tp.offset
        else:
            low, high = watermarks(replies, args.reply_topic, tp.partition)
            starts[tp.partition] = low if has_open else high
            to_commit.append(TopicPartition(args.reply_topic, tp.partition, starts[tp.partition]))
    if to_commit:
        replies.commit(offsets=to_commit, asynchronous=False)
    replies.assign([TopicPartition(args.reply_topic, p, o) for p, o in starts.items()])
    positions = Positions(starts)
    committed = dict(starts)

    # What is tracked: the journal entry, plus the stream state and the first chunk's offset.
    tracked = {rid: {"entry": e, "first_chunk": None, "text": "", "last_seq": None} for rid, e in entries.items()}

    def publish(request_ids, producer):
        failures = []
        for rid in request_ids:
            entry = tracked[rid]["entry"]
            producer.produce(
                entry["topic"],
                key=rid.encode("utf-8"),
                value=json.dumps(entry["request"]).encode("utf-8"),
                headers={"ferry-schema-version": str(entry["request"].get("version", 1))},
                on_delivery=lambda error, _m, rid=rid: failures.append((rid, error)) if error else None,
            )
        if producer.flush(TIMEOUT) != 0 or failures:
            raise RuntimeError(f"requests not delivered: {failures}")
        for rid in request_ids:
            tracked[rid]["entry"]["state"] = "sent"
            journal.write(rid, tracked[rid]["entry"])
        journal.confirm()

    requests_out = Producer({**conf, "enable.idempotence": True, "linger.ms": 0})
    # Publish again what may never have reached the broker.
    publish([rid for rid, t in tracked.items() if t["entry"]["state"] == "sending"], requests_out)

    if args.fan_out:
        with open(args.fan_out, encoding="utf-8") as lines:
            requests = [json.loads(line) for line in lines if line.strip()]
        new = []
        for request in requests:
            if request["id"] in tracked:
                log(f"{request['id']} is already open; awaiting it without sending it again")
                continue
            request.setdefault("reply_to", args.reply_topic)
            deadline = request.get("deadline")
            deadline_ms = now_ms() + int(args.timeout * 1000)
            if deadline:
                deadline_ms = int(datetime.fromisoformat(deadline.replace("Z", "+00:00")).timestamp() * 1000)
            entry = {
                "version": ENTRY_VERSION,
                "state": "sending",
                "topic": args.topic,
                "deadline_ms": deadline_ms,
                "request": request,
            }
            tracked[request["id"]] = {"entry": entry, "first_chunk": None, "text": "", "last_seq": None}
            journal.write(request["id"], entry)
            new.append(request["id"])
        journal.confirm()  # every `sending` record is in before anything is published
        publish(new, requests_out)

    errors = expired = 0
    at_end, caught_up = set(), False
    last_commit = time.monotonic()

    def hand_over(rid):
        """Prints a finished request's outcome, then acknowledges it with a tombstone."""
        nonlocal errors, expired
        entry = tracked[rid]["entry"]
        if entry["state"] == "expired":
            expired += 1
            line = {"kind": "expired", "id": rid, "deadline_ms": entry["deadline_ms"]}
        else:
            errors += entry["reply"]["kind"] == "error"
            line = entry["reply"]
        print(json.dumps(line), flush=True)
        journal.write(rid, None)
        journal.confirm()
        del tracked[rid]

    for rid in [rid for rid, t in tracked.items() if t["entry"]["state"] in ("answered", "expired")]:
        hand_over(rid)

    while tracked:
        message = replies.poll(0.1)
        if message is not None and message.error():
            if message.error().code() == KafkaError._PARTITION_EOF:
                at_end.add(message.partition())
                caught_up = caught_up or len(at_end) >= len(starts)
        elif message is not None:
            p, o = message.partition(), message.offset()
            rid = (message.key() or b"").decode("utf-8", "replace")
            t = tracked.get(rid)
            if t is None or t["entry"]["state"] not in ("sending", "sent"):
                positions.read(p, o, False)  # another caller's, or a duplicate
            else:
                try:
                    reply = json.loads(message.value())
                except (TypeError, ValueError):
                    reply = None
                if not isinstance(reply, dict) or reply.get("id") != rid:
                    positions.read(p, o, False)
                elif reply.get("kind") == "chunk":
                    first = t["first_chunk"] is None
                    if first:
                        t["first_chunk"] = (p, o)
                    if t["last_seq"] is None or reply["seq"] > t["last_seq"]:
                        t["last_seq"] = reply["seq"]
                        t["text"] += reply["text"]
                    positions.read(p, o, first)
                else:
                    positions.read(p, o, True)
                    t["entry"]["state"] = "answered"
                    t["entry"]["reply"] = reply
                    journal.write(rid, t["entry"])
                    journal.confirm()
                    positions.release(p, o)
                    if t["first_chunk"]:
                        positions.release(*t["first_chunk"])
                    hand_over(rid)
        if caught_up:
            for rid in [rid for rid, t in tracked.items() if t["entry"]["deadline_ms"] <= now_ms()]:
                t = tracked[rid]
                t["entry"]["state"] = "expired"
                journal.write(rid, t["entry"])
                journal.confirm()
                if t["first_chunk"]:
                    positions.release(*t["first_chunk"])
                hand_over(rid)
        if time.monotonic() - last_commit >= COMMIT_INTERVAL:
            commit_moved(replies, args.reply_topic, positions, committed)
            last_commit = time.monotonic()

    commit_moved(replies, args.reply_topic, positions, committed)
    replies.close()
    sys.exit(3 if errors else 4 if expired else 0)


def commit_moved(consumer, topic, positions, committed):
    moved = {p: o for p, o in positions.positions().items() if committed.get(p) != o}
    if moved:
        consumer.commit(offsets=[TopicPartition(topic, p, o) for p, o in moved.items()], asynchronous=False)
        committed.update(moved)


if __name__ == "__main__":
    main()

use super::*;

#[test]
fn a_recovered_entry_resumes_in_the_phase_its_state_says() -> Result<(), serde_json::Error> {
    let entry = |state: &str, reply: Option<serde_json::Value>| -> Result<Entry, serde_json::Error> {
        let mut json = serde_json::json!({
            "version": 1, "state": state, "topic": "t", "deadline_ms": 5,
            "request": {"id": "a", "prompt": "p", "reply_to": "r"}
        });
        if let Some(reply) = reply {
            json["reply"] = reply;
        }
        serde_json::from_value(json)
    };
    let response = serde_json::json!({
        "kind": "response", "version": 1, "id": "a", "model": "m", "text": "hi",
        "finish_reason": "stop", "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        "timings": {"queued_ms": 0.0, "prefill_ms": 0.0, "decode_ms": 0.0, "total_ms": 0.0},
        "worker": "w", "attempt": 1, "resumed_from_token": null
    });
    let sending = recovered_request(entry("sending", None)?);
    assert_eq!(
        (sending.phase, sending.journal_state()),
        (Phase::Sending, EntryState::Sending)
    );
    let sent = recovered_request(entry("sent", None)?);
    assert_eq!((sent.phase, sent.journal_state()), (Phase::Sent, EntryState::Sent));
    let answered = recovered_request(entry("answered", Some(response))?);
    assert_eq!(answered.phase, Phase::Finished);
    assert_eq!(answered.journal_state(), EntryState::Answered);
    assert_eq!(
        answered.progress.borrow().stream.text(),
        "hi",
        "the whole text as one delta"
    );
    let expired = recovered_request(entry("expired", None)?);
    assert_eq!(expired.journal_state(), EntryState::Expired);
    assert_eq!(
        expired.progress.borrow().outcome,
        Some(Outcome::Expired {
            id: "a".into(),
            deadline_ms: 5
        })
    );
    let answered_without_reply = recovered_request(entry("answered", None)?);
    assert_eq!(answered_without_reply.phase, Phase::Sent);
    Ok(())
}

use super::*;

#[test]
fn the_callers_flags_replace_the_harness_flags_in_either_spelling() {
    let args = WorkerArgs::new()
        .basics("127.0.0.1:9", Path::new("m.gguf"), "w-1")
        .set("--threads", "1")
        .set("--max-in-flight", "2")
        .set("--threads", "3")
        .extra(&["--max-in-flight=4", "--resume", "tokens"])
        .build();
    assert_eq!(
        args.join(" "),
        "--bootstrap-servers 127.0.0.1:9 --model m.gguf --worker-id w-1 --threads 3 \
         --max-in-flight=4 --resume tokens"
    );
}

#[test]
fn a_flag_that_only_starts_like_another_does_not_replace_it() {
    let args = WorkerArgs::new()
        .set("--snapshot-store", "file:///a")
        .extra(&["--snapshot-store-timeout", "5s"]);
    assert!(!args.overrides("--snapshot-store"));
    assert_eq!(args.build()[..2], ["--snapshot-store", "file:///a"]);
}

#[test]
fn a_pipeline_names_its_dead_letters_after_its_requests() {
    let p = Pipeline::new();
    assert_eq!(p.dlq, format!("{}.dlq", p.requests));
    assert_ne!(p.group, Pipeline::new().group);
    assert_eq!(
        p.args().build(),
        [
            "--topic",
            &p.requests,
            "--reply-topic",
            &p.replies,
            "--group-id",
            &p.group
        ]
    );
}

use super::*;

#[test]
fn accepts_the_keys_the_format_uses() {
    for key in [
        "ferry/0123abcd/manifest",
        "ferry/0123abcd/piece-000012",
        "a",
        "a.b/c_d-e",
    ] {
        assert!(check_key(key).is_ok(), "{key}");
    }
}

#[test]
fn refuses_keys_that_could_escape_or_need_escaping() {
    for key in [
        "", "/a", "a/", "a//b", "a/../b", "..", ".hidden", "a/.tmp", "a b", "a*", "a?b", "a[1]", "a\\b", "é",
    ] {
        assert!(
            matches!(check_key(key), Err(StoreError::InvalidKey { .. })),
            "{key:?} was accepted"
        );
    }
}

#[test]
fn prefixes_drop_one_trailing_slash_and_the_empty_one_is_the_whole_store() {
    assert_eq!(check_prefix("ferry/ab/").ok(), Some("ferry/ab"));
    assert_eq!(check_prefix("ferry/ab").ok(), Some("ferry/ab"));
    assert_eq!(check_prefix("").ok(), Some(""));
    assert_eq!(check_prefix("/").ok(), Some(""));
    assert!(check_prefix("ferry//").is_err());
    assert!(check_delete_prefix("").is_err());
    assert!(check_delete_prefix("/").is_err());
}

#[test]
fn redacts_passwords() {
    assert_eq!(
        redact("redis://user:secret@host:6379/0"),
        "redis://user:REDACTED@host:6379/0"
    );
    assert_eq!(redact("s3://bucket/prefix"), "s3://bucket/prefix");
    assert_eq!(redact("rediss://:secret@host:6380"), "rediss://:REDACTED@host:6380");
    assert_eq!(
        redact("redis://user@host"),
        "redis://user@host",
        "no password, nothing hidden"
    );
    // Credentials in an object store URL are hidden the same way.
    assert_eq!(
        redact("s3://AKIAX:verysecret@bucket/prefix"),
        "s3://AKIAX:REDACTED@bucket/prefix"
    );
    // A URL that does not parse loses all of its userinfo.
    let broken = redact("redis://user:secret@host:notaport/0");
    assert!(!broken.contains("secret"), "{broken}");
    assert_eq!(broken, "redis://REDACTED@host:notaport/0");
    assert_eq!(redact("redis://us:er:se@cr@et@host:x"), "redis://REDACTED@host:x");
    assert_eq!(redact("user:secret@host"), "REDACTED@host");
    assert_eq!(redact("/no/scheme"), "/no/scheme");
}

#[tokio::test]
async fn unknown_schemes_name_the_supported_ones() {
    let err = open("ftp://host/x", Duration::from_secs(60))
        .await
        .expect_err("ftp is not a store");
    let message = err.to_string();
    assert!(
        message.contains("ftp") && message.contains("s3://") && message.contains("redis://"),
        "{message}"
    );
    assert!(matches!(
        open("not a url", Duration::from_secs(60)).await,
        Err(StoreError::Config { .. })
    ));
    assert!(matches!(
        open("file://relative", Duration::from_secs(60)).await,
        Err(StoreError::Config { .. })
    ));
}

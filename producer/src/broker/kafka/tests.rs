use super::storage::{base64_url, cluster_id, free_ports};
use super::*;

#[test]
fn base64_url_matches_the_rfc_4648_vectors() {
    for (input, expected) in [
        ("", ""),
        ("f", "Zg"),
        ("fo", "Zm8"),
        ("foo", "Zm9v"),
        ("foob", "Zm9vYg"),
        ("fooba", "Zm9vYmE"),
    ] {
        assert_eq!(base64_url(input.as_bytes()), expected);
    }
    assert_eq!(base64_url(&[0xfb, 0xff]), "-_8");
}

#[test]
fn cluster_ids_have_kafkas_form() {
    for _ in 0..200 {
        let id = cluster_id();
        assert_eq!(id.len(), 22);
        assert!(!id.starts_with('-'));
    }
}

#[test]
fn server_properties_name_both_listeners_and_the_partitions() {
    let text = server_properties(Path::new("/tmp/d"), 9092, 9093, 7);
    assert!(text.contains("listeners=PLAINTEXT://127.0.0.1:9092,CONTROLLER://127.0.0.1:9093\n"));
    assert!(text.contains("controller.quorum.voters=1@127.0.0.1:9093\n"));
    assert!(text.contains("num.partitions=7\n"));
    assert!(text.contains("log.dirs=/tmp/d\n"));
}

#[test]
fn free_ports_are_distinct() -> anyhow::Result<()> {
    let (a, b) = free_ports()?;
    assert_ne!(a, b);
    Ok(())
}

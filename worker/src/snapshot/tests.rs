use super::format::PieceRef;
use super::*;

#[test]
fn a_requests_keys_are_its_pieces_its_manifest_and_its_ledger() {
    let prefix = "ferry/ab/";
    assert_eq!(
        request_keys(prefix, None),
        ["ferry/ab/manifest", "ferry/ab/attempts", "ferry/ab/done"]
    );
    let piece = |name: &str| PieceRef {
        name: name.into(),
        from: 0,
        to: 1,
        bytes: 1,
        crc32: 0,
    };
    let manifest = Manifest {
        version: format::FORMAT_VERSION,
        model: "m".into(),
        request: "r".into(),
        prompt_len: 1,
        tokens: vec![1, 2],
        pieces: vec![piece("piece-000001-0abc1234"), piece("piece-000002-0abc1234")],
        attempt: 1,
        worker: "w".into(),
        seq: 2,
    };
    assert_eq!(
        request_keys(prefix, Some(&manifest)),
        [
            "ferry/ab/piece-000001-0abc1234",
            "ferry/ab/piece-000002-0abc1234",
            "ferry/ab/manifest",
            "ferry/ab/attempts",
            "ferry/ab/done"
        ]
    );
}

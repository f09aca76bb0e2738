#[test]
fn request_prefixes_are_bound_to_the_whole_request() {
    let base = request_prefix("req", "id-1", "rep", b"{\"id\":\"id-1\",\"prompt\":\"a\"}");
    assert_eq!(
        base,
        request_prefix("req", "id-1", "rep", b"{\"id\":\"id-1\",\"prompt\":\"a\"}")
    );
    assert!(base.starts_with("ferry/") && base.ends_with('/') && base.len() == 39);
    for other in [
        request_prefix("req", "id-1", "rep", b"{\"id\":\"id-1\",\"prompt\":\"b\"}"),
        request_prefix("req", "id-1", "rep-2", b"{\"id\":\"id-1\",\"prompt\":\"a\"}"),
        request_prefix("req2", "id-1", "rep", b"{\"id\":\"id-1\",\"prompt\":\"a\"}"),
        // Lengths are hashed too, so parts cannot trade bytes.
        request_prefix("re", "qid-1", "rep", b"{\"id\":\"id-1\",\"prompt\":\"a\"}"),
    ] {
        assert_ne!(base, other);
    }
}
use super::*;
use crate::engine::SamplingParams;

const SHAPE: KvShape = KvShape {
    n_layer: 2,
    n_kv_head: 3,
    head_dim: 4,
};

fn piece(from: u32, to: u32) -> Piece {
    let per = SHAPE.values_per_tensor(to - from);
    let layers = (0..SHAPE.n_layer)
        .map(|l| {
            let k = (0..per).map(|i| (l * 1000 + from) as f32 + i as f32 * 0.5).collect();
            let v = (0..per).map(|i| -((l * 1000 + from) as f32) - i as f32).collect();
            (k, v)
        })
        .collect();
    Piece { from, to, layers }
}

fn entry(p: &Piece, bytes: &[u8]) -> PieceRef {
    PieceRef {
        name: "piece-0".into(),
        from: p.from,
        to: p.to,
        bytes: bytes.len() as u64,
        crc32: u32::from_le_bytes(bytes[bytes.len() - 4..].try_into().expect("4 bytes")),
    }
}

fn manifest(tokens: Vec<u32>, pieces: Vec<PieceRef>) -> Manifest {
    Manifest {
        version: FORMAT_VERSION,
        model: "m".into(),
        request: "r".into(),
        prompt_len: 5,
        tokens,
        pieces,
        attempt: 1,
        worker: "w".into(),
        seq: 1,
    }
}

#[test]
fn piece_round_trips_bit_exactly() {
    let mut p = piece(5, 9);
    p.layers[0].0[1] = f32::from_bits(0x7f80_0001); // a NaN payload survives too
    let bytes = p.encode(SHAPE);
    let back = Piece::decode(&bytes, SHAPE, &entry(&p, &bytes)).expect("decodes");
    let bits = |p: &Piece| {
        p.layers
            .iter()
            .flat_map(|(k, v)| k.iter().chain(v).map(|x| x.to_bits()))
            .collect::<Vec<_>>()
    };
    assert_eq!(bits(&back), bits(&p));
}

#[test]
fn every_flipped_byte_or_truncation_is_caught() {
    let p = piece(0, 3);
    let bytes = p.encode(SHAPE);
    let e = entry(&p, &bytes);
    for i in (0..bytes.len()).step_by(7) {
        let mut bad = bytes.clone();
        bad[i] ^= 0x20;
        assert!(Piece::decode(&bad, SHAPE, &e).is_err(), "flip at {i} went unnoticed");
    }
    for cut in [0, 10, bytes.len() / 2, bytes.len() - 1] {
        assert!(
            Piece::decode(&bytes[..cut], SHAPE, &e).is_err(),
            "cut at {cut} went unnoticed"
        );
    }
    let other = KvShape { head_dim: 8, ..SHAPE };
    assert_eq!(Piece::decode(&bytes, other, &e), Err(FormatError::WrongModel));
}

#[test]
fn manifest_round_trips_and_checks_its_owner() {
    let p0 = piece(0, 5);
    let b0 = p0.encode(SHAPE);
    let p1 = piece(5, 7);
    let b1 = p1.encode(SHAPE);
    let m = manifest(vec![10, 11, 12], vec![entry(&p0, &b0), entry(&p1, &b1)]);
    let bytes = m.encode();
    assert_eq!(Manifest::decode(&bytes, "m", "r"), Ok(m.clone()));
    assert_eq!(m.kv_positions(), 7);
    assert_eq!(Manifest::decode(&bytes, "other", "r"), Err(FormatError::WrongModel));
    assert_eq!(Manifest::decode(&bytes, "m", "other"), Err(FormatError::WrongRequest));
    for cut in [0, 5, bytes.len() - 3] {
        assert!(Manifest::decode(&bytes[..cut], "m", "r").is_err());
    }
    let mut flipped = bytes.clone();
    let i = bytes.len() / 2;
    flipped[i] ^= 1;
    assert!(Manifest::decode(&flipped, "m", "r").is_err());
}

#[test]
fn manifest_rejects_gaps_and_wrong_coverage() {
    let p0 = piece(0, 5);
    let b0 = p0.encode(SHAPE);
    let p2 = piece(6, 7);
    let b2 = p2.encode(SHAPE);
    let gap = manifest(vec![1, 2, 3], vec![entry(&p0, &b0), entry(&p2, &b2)]);
    assert!(matches!(
        Manifest::decode(&gap.encode(), "m", "r"),
        Err(FormatError::Malformed(_))
    ));
    // Five prompt positions and three tokens means seven cached positions, not five.
    let short = manifest(vec![1, 2, 3], vec![entry(&p0, &b0)]);
    assert!(matches!(
        Manifest::decode(&short.encode(), "m", "r"),
        Err(FormatError::Malformed(_))
    ));
    let mut future = manifest(vec![1], vec![]);
    future.version = 99;
    assert_eq!(
        Manifest::decode(&future.encode(), "m", "r"),
        Err(FormatError::Version(99))
    );
}

#[test]
fn fingerprints_separate_what_must_be_separate() {
    let params = |seed| GenerationParams {
        sampling: SamplingParams {
            temperature: 0.7,
            top_p: 0.9,
            top_k: 40,
            seed,
        },
        max_tokens: 64,
        stop: vec!["\n\n".into()],
    };
    let a = request_fingerprint(&[1, 2, 3], &params(1));
    assert_eq!(a, request_fingerprint(&[1, 2, 3], &params(1)));
    assert_ne!(a, request_fingerprint(&[1, 2, 3], &params(2)));
    assert_ne!(a, request_fingerprint(&[1, 2, 4], &params(1)));
    assert_ne!(
        model_fingerprint("abc", "q8-0", "cpu"),
        model_fingerprint("abc", "native", "cpu")
    );
    assert_ne!(snapshot_prefix("t", "a"), snapshot_prefix("t2", "a"));
    assert!(snapshot_prefix("t", "a/../b").starts_with("ferry/"));
}

#[test]
fn a_piece_takes_the_bytes_its_shape_and_positions_say() {
    for (from, to) in [(0, 1), (3, 10)] {
        assert_eq!(piece(from, to).encode(SHAPE).len() as u64, SHAPE.piece_bytes(to - from));
    }
}

/// The widest manifest this format writes for a context (every number at its widest, one piece
/// per position, a long worker name) fits the cap readers apply.
#[test]
fn the_widest_manifest_of_a_context_fits_its_cap() {
    let context = 2048u32;
    let prompt_len = 1;
    let tokens = vec![u32::MAX; (context - prompt_len) as usize];
    let pieces = (0..context - 1)
        .map(|at| PieceRef {
            name: format!("piece-{:06}-{:08x}", u64::MAX, u32::MAX),
            from: at,
            to: at + 1,
            bytes: u64::MAX,
            crc32: u32::MAX,
        })
        .collect();
    let m = Manifest {
        model: "f".repeat(64),
        request: "f".repeat(64),
        prompt_len,
        worker: "w".repeat(253),
        attempt: u32::MAX,
        seq: u64::MAX,
        ..manifest(tokens, pieces)
    };
    let len = m.encode().len();
    let cap = max_manifest_bytes(context as usize);
    assert!(len <= cap, "{len} bytes > cap {cap}");
    // And the cap is not wildly loose: within the fixed overhead of the widest manifest.
    assert!(cap - len < 64 * 1024 + context as usize * 64, "{len} bytes, cap {cap}");
}

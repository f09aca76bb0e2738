use std::collections::HashMap;

use gguf_file::Value;

use super::*;

/// A small llama's metadata (no tensors): 4 query heads over 2 KV heads in an embedding of
/// 64, with `changes` set.
fn content(changes: &[(&str, u32)]) -> gguf_file::Content {
    let mut metadata = HashMap::from([
        ("general.architecture".to_string(), Value::String("llama".into())),
        ("llama.attention.layer_norm_rms_epsilon".into(), Value::F32(1e-5)),
    ]);
    for (key, value) in [
        ("llama.attention.head_count", 4),
        ("llama.attention.head_count_kv", 2),
        ("llama.embedding_length", 64),
        ("llama.block_count", 1),
        ("llama.context_length", 16),
        ("llama.vocab_size", 10),
    ] {
        metadata.insert(key.into(), Value::U32(value));
    }
    for &(key, value) in changes {
        metadata.insert(key.into(), Value::U32(value));
    }
    gguf_file::Content {
        magic: gguf_file::VersionedMagic::GgufV3,
        metadata,
        tensor_infos: HashMap::new(),
        tensor_data_offset: 0,
    }
}

#[test]
fn head_counts_and_widths_that_cannot_split_the_embedding_are_metadata_errors() {
    let config = LlamaConfig::from_gguf(&content(&[])).expect("a valid config");
    assert_eq!((config.n_head, config.n_kv_head, config.head_dim), (4, 2, 16));
    // A head width given outright need not be the embedding's share.
    let config = LlamaConfig::from_gguf(&content(&[("llama.rope.dimension_count", 32)]));
    assert_eq!(config.expect("a valid config").head_dim, 32);
    for (changes, key, value) in [
        (
            &[("llama.attention.head_count", 0)][..],
            "llama.attention.head_count",
            0,
        ),
        (
            &[("llama.attention.head_count_kv", 0)],
            "llama.attention.head_count_kv",
            0,
        ),
        (&[("llama.embedding_length", 0)], "llama.embedding_length", 0),
        // Six heads share the two KV heads, but not the embedding of 64.
        (&[("llama.attention.head_count", 6)], "llama.attention.head_count", 6),
        (
            &[("llama.attention.head_count_kv", 3)],
            "llama.attention.head_count_kv",
            3,
        ),
        (&[("llama.rope.dimension_count", 0)], "llama.rope.dimension_count", 0),
        (&[("llama.rope.dimension_count", 15)], "llama.rope.dimension_count", 15),
        // Eight heads of three values: rotary embeddings turn pairs.
        (
            &[("llama.embedding_length", 24), ("llama.attention.head_count", 8)],
            "llama.attention.head_count",
            8,
        ),
        // Zero heads are refused with an explicit width too, where nothing divides by them.
        (
            &[("llama.attention.head_count", 0), ("llama.rope.dimension_count", 16)],
            "llama.attention.head_count",
            0,
        ),
    ] {
        let result = LlamaConfig::from_gguf(&content(changes));
        let Err(ModelError::InvalidMetadata { key: k, value: v, .. }) = &result else {
            panic!("{changes:?}: {result:?}")
        };
        assert_eq!((k.as_str(), *v), (key, value), "{changes:?}");
        let text = result.expect_err("an error").to_string();
        assert!(text.contains(key) && text.contains(&value.to_string()), "{text}");
    }
}

#[test]
fn rope_table_starts_at_identity() -> candle_core::Result<()> {
    let (cos, sin) = rope_tables(4, 10_000.0, 3, &Device::Cpu)?;
    assert_eq!(cos.dims(), [3, 2]);
    let c0: Vec<f32> = cos.i(0)?.to_vec1()?;
    let s0: Vec<f32> = sin.i(0)?.to_vec1()?;
    assert_eq!((c0, s0), (vec![1., 1.], vec![0., 0.]));
    Ok(())
}

//! What the engine thread hands the snapshot writer: the tokens so far and the new cache
//! positions, still on the device.

use candle_core::Tensor;

use crate::model::cache::values_of;
use crate::model::ModelError;
use crate::snapshot::format::Piece;

/// What the engine hands over at a snapshot point.
#[derive(Debug)]
pub(super) struct Delta {
    pub(super) tokens: Vec<u32>,
    pub(super) kv: Option<Captured>,
}

/// New cache positions as the engine thread took them: on the device, copied out of the cache
/// but not yet read back. The writer task reads them back to the host ([`Captured::to_piece`]),
/// so a GPU's device-to-host copy is not on the decode path.
#[derive(Debug)]
pub(super) struct Captured {
    pub(super) from: u32,
    pub(super) to: u32,
    pub(super) layers: Vec<(Tensor, Tensor)>,
}

impl Captured {
    /// `next`'s positions after these; they must follow on.
    pub(super) fn append(&mut self, next: Captured) -> Result<(), ModelError> {
        if next.from != self.to || next.layers.len() != self.layers.len() {
            return Err(ModelError::Internal("snapshot pieces that do not follow on".into()));
        }
        for ((k, v), (nk, nv)) in self.layers.iter_mut().zip(next.layers) {
            *k = Tensor::cat(&[&*k, &nk], 2)?;
            *v = Tensor::cat(&[&*v, &nv], 2)?;
        }
        self.to = next.to;
        Ok(())
    }

    pub(super) fn to_piece(&self) -> Result<Piece, ModelError> {
        Ok(Piece {
            from: self.from,
            to: self.to,
            layers: values_of(&self.layers)?,
        })
    }
}

impl Delta {
    /// `older` followed by `newer`, as one delta.
    pub(super) fn merge(older: Delta, newer: Delta) -> Delta {
        let kv = match (older.kv, newer.kv) {
            // A newer full copy (from position 0) supersedes everything older.
            (Some(mut a), Some(b)) if b.from != 0 => match a.append(b) {
                Ok(()) => Some(a),
                // Not contiguous: cannot happen, since offers extract from where the last one
                // ended; drop the older part rather than store a gap (the next full copy fixes it).
                Err(_) => None,
            },
            (Some(a), None) => Some(a),
            (_, kv) => kv,
        };
        Delta {
            tokens: newer.tokens,
            kv,
        }
    }
}

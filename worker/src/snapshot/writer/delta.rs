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
    /// Each capture's layers, in order of position: merging only lists them, so the engine
    /// thread never copies them again while the writer is behind.
    parts: Vec<Vec<(Tensor, Tensor)>>,
}

impl Captured {
    /// Positions `[from, to)` of every layer, as [`SequenceCache::range_tensors`] copied them.
    ///
    /// [`SequenceCache::range_tensors`]: crate::model::SequenceCache::range_tensors
    pub(super) fn new(from: u32, to: u32, layers: Vec<(Tensor, Tensor)>) -> Captured {
        Captured {
            from,
            to,
            parts: vec![layers],
        }
    }

    /// `next`'s positions after these; they must follow on.
    pub(super) fn append(&mut self, mut next: Captured) -> Result<(), ModelError> {
        if next.from != self.to {
            return Err(ModelError::Internal("snapshot pieces that do not follow on".into()));
        }
        self.parts.append(&mut next.parts);
        self.to = next.to;
        Ok(())
    }

    /// The positions read back to the host, as one piece.
    pub(super) fn to_piece(&self) -> Result<Piece, ModelError> {
        let mut whole: Option<Piece> = None;
        let mut from = self.from;
        for layers in &self.parts {
            // Shaped `(1, n_kv_head, positions, head_dim)`.
            let positions = match layers.first() {
                Some((k, _)) => k.dim(2)?,
                None => 0,
            };
            let to = from + positions as u32;
            let piece = Piece {
                from,
                to,
                layers: values_of(layers)?,
            };
            match &mut whole {
                None => whole = Some(piece),
                Some(w) => w.append(piece).map_err(|e| ModelError::Internal(e.to_string()))?,
            }
            from = to;
        }
        match whole {
            Some(piece) if piece.to == self.to => Ok(piece),
            _ => Err(ModelError::Internal(format!(
                "a snapshot capture of [{}, {}) that does not add up",
                self.from, self.to
            ))),
        }
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

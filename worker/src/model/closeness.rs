//! How far two logit vectors are apart: the measure the engine's tests hold Ferry's forward pass
//! to against candle's, and the GPU check holds the device to against the CPU.

/// The largest difference, the difference's L2 norm relative to the reference's, and whether
/// both pick the same token.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Closeness {
    pub max: f32,
    pub relative: f32,
    pub same_argmax: bool,
}

/// `ours` against `reference` (the same length).
pub fn closeness(ours: &[f32], reference: &[f32]) -> Closeness {
    assert_eq!(ours.len(), reference.len());
    let argmax = |v: &[f32]| (0..v.len()).fold(0, |best, i| if v[i] > v[best] { i } else { best });
    let l2 = |v: &mut dyn Iterator<Item = f32>| v.map(|x| x * x).sum::<f32>().sqrt();
    Closeness {
        max: ours
            .iter()
            .zip(reference)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max),
        relative: l2(&mut ours.iter().zip(reference).map(|(a, b)| a - b)) / l2(&mut reference.iter().copied()),
        same_argmax: argmax(ours) == argmax(reference),
    }
}

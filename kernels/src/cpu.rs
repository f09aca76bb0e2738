//! The CPU features the x86 paths need, and the one place that asks the CPU for them.
//!
//! Every check of a path ([`crate::Path::available`]) goes through [`has`], so the tests can
//! make this CPU appear to lack a feature (`tests::without`) and check that the public
//! entries refuse the paths that need it: on a CPU that has every feature, nothing else could
//! show that a check is made at all.

/// A CPU feature that one of the x86 paths needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Feature {
    Avx2,
    Fma,
    AvxVnni,
    Avx512F,
    Avx512Vl,
    Avx512Vnni,
}

/// Whether this CPU has `feature` (never, off x86-64).
pub(crate) fn has(feature: Feature) -> bool {
    #[cfg(test)]
    if tests::denied(feature) {
        return false;
    }
    detected(feature)
}

#[cfg(target_arch = "x86_64")]
fn detected(feature: Feature) -> bool {
    match feature {
        Feature::Avx2 => is_x86_feature_detected!("avx2"),
        Feature::Fma => is_x86_feature_detected!("fma"),
        Feature::AvxVnni => is_x86_feature_detected!("avxvnni"),
        Feature::Avx512F => is_x86_feature_detected!("avx512f"),
        Feature::Avx512Vl => is_x86_feature_detected!("avx512vl"),
        Feature::Avx512Vnni => is_x86_feature_detected!("avx512vnni"),
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn detected(_: Feature) -> bool {
    false
}

#[cfg(test)]
pub(crate) mod tests {
    use std::cell::RefCell;

    use super::Feature;

    thread_local! {
        /// Features that [`super::has`] reports absent on this thread.
        static DENIED: RefCell<Vec<Feature>> = const { RefCell::new(Vec::new()) };
    }

    pub(super) fn denied(feature: Feature) -> bool {
        DENIED.with(|d| d.borrow().contains(&feature))
    }

    /// Runs `f` with `features` reported absent on the calling thread (the public entries check
    /// their path there, before any work goes to the pool).
    pub(crate) fn without<R>(features: &[Feature], f: impl FnOnce() -> R) -> R {
        /// Restores the denied set, even if `f` panics.
        struct Restore(Vec<Feature>);
        impl Drop for Restore {
            fn drop(&mut self) {
                DENIED.with(|d| *d.borrow_mut() = std::mem::take(&mut self.0));
            }
        }
        let before = DENIED.with(|d| {
            let before = d.borrow().clone();
            d.borrow_mut().extend_from_slice(features);
            before
        });
        let _restore = Restore(before);
        f()
    }
}

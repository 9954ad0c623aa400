//! GPU selectors: turning a request's `repeated GpuSelector` into GPUs.
//!
//! Every RPC that names GPUs goes through [`resolve`], so the rules (and the
//! error messages that explain them) are the same everywhere: read RPCs treat
//! an empty list as "every GPU"; control RPCs insist on at least one selector;
//! unknown GPUs are NOT_FOUND with the list of GPUs that do exist. A MIG
//! instance's UUID selects its parent GPU for reads (the parent's sample
//! carries the instance); control RPCs refuse it, since limits, clocks and
//! thresholds are set on the parent.

use tonic::Status;

use crate::api::{GpuSelector, gpu_selector::Selector};

/// Most selectors one request may carry.
pub const MAX_SELECTORS: usize = 64;
/// Longest UUID accepted (NVML's are 40 characters; MIG ones up to ~80).
pub const MAX_UUID_LEN: usize = 128;

/// Whether an empty selector list means "every GPU".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Empty {
    MeansAll,
    Refused,
}

/// A GPU as selectors see it.
pub trait Selectable {
    fn index(&self) -> u32;
    fn uuid(&self) -> &str;
    /// The profile of this GPU's MIG instance with UUID `uuid`, if it has one.
    fn mig_child(&self, _uuid: &str) -> Option<&str> {
        None
    }
}

impl Selectable for crate::api::DeviceInfo {
    fn index(&self) -> u32 {
        self.index
    }
    fn uuid(&self) -> &str {
        &self.uuid
    }
    fn mig_child(&self, uuid: &str) -> Option<&str> {
        self.mig_instances
            .iter()
            .find(|m| m.uuid.eq_ignore_ascii_case(uuid))
            .map(|m| m.profile.as_str())
    }
}

/// Positions in `gpus` (in order, without duplicates) that `selectors` pick.
pub fn resolve<G: Selectable>(
    selectors: &[GpuSelector],
    gpus: &[G],
    empty: Empty,
) -> Result<Vec<usize>, Status> {
    if selectors.len() > MAX_SELECTORS {
        return Err(Status::invalid_argument(format!(
            "gpus: {} selectors; at most {MAX_SELECTORS} are allowed",
            selectors.len()
        )));
    }
    if selectors.is_empty() {
        return match empty {
            Empty::MeansAll => Ok((0..gpus.len()).collect()),
            Empty::Refused => Err(Status::invalid_argument(
                "gpus: name at least one GPU (by index or UUID, or `all: true` for every GPU)",
            )),
        };
    }
    let mut picked = vec![false; gpus.len()];
    for (i, sel) in selectors.iter().enumerate() {
        match &sel.selector {
            None => {
                return Err(Status::invalid_argument(format!(
                    "gpus[{i}]: empty selector; set one of `all`, `index` or `uuid`"
                )));
            }
            Some(Selector::All(false)) => {
                return Err(Status::invalid_argument(format!(
                    "gpus[{i}].all: must be true when set"
                )));
            }
            Some(Selector::All(true)) => picked.iter_mut().for_each(|p| *p = true),
            Some(Selector::Index(index)) => {
                let pos = gpus
                    .iter()
                    .position(|g| g.index() == *index)
                    .ok_or_else(|| {
                        Status::not_found(format!(
                            "gpus[{i}]: no GPU with index {index}; this host has {}",
                            describe_indices(gpus)
                        ))
                    })?;
                picked[pos] = true;
            }
            Some(Selector::Uuid(uuid)) => {
                if uuid.is_empty() || uuid.len() > MAX_UUID_LEN {
                    return Err(Status::invalid_argument(format!(
                        "gpus[{i}].uuid: must be 1 to {MAX_UUID_LEN} characters, e.g. \"GPU-8f7e1a2b-...\""
                    )));
                }
                let exact = gpus
                    .iter()
                    .position(|g| !g.uuid().is_empty() && g.uuid().eq_ignore_ascii_case(uuid));
                let child = || {
                    gpus.iter()
                        .enumerate()
                        .find_map(|(pos, g)| g.mig_child(uuid).map(|p| (pos, g, p)))
                };
                let pos = match (exact, child()) {
                    (Some(pos), _) => pos,
                    (None, Some((pos, _, _))) if empty == Empty::MeansAll => pos,
                    (None, Some((_, g, profile))) => {
                        return Err(Status::failed_precondition(format!(
                            "gpus[{i}]: {uuid} is a MIG instance ({profile}) of GPU {} ({}); power limits, clocks and thresholds are set on the parent GPU: select GPU {} instead",
                            g.index(),
                            g.uuid(),
                            g.index()
                        )));
                    }
                    (None, None) => {
                        let known: Vec<_> = gpus
                            .iter()
                            .map(|g| g.uuid())
                            .filter(|u| !u.is_empty())
                            .collect();
                        return Err(Status::not_found(format!(
                            "gpus[{i}]: no GPU with UUID {uuid:?}; this host has {}",
                            if known.is_empty() {
                                "none".to_owned()
                            } else {
                                known.join(", ")
                            }
                        )));
                    }
                };
                picked[pos] = true;
            }
        }
    }
    Ok(picked
        .iter()
        .enumerate()
        .filter_map(|(i, p)| p.then_some(i))
        .collect())
}

fn describe_indices<G: Selectable>(gpus: &[G]) -> String {
    if gpus.is_empty() {
        return "no GPUs".to_owned();
    }
    let list: Vec<_> = gpus.iter().map(|g| g.index().to_string()).collect();
    format!("GPU indices {}", list.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    struct G(u32, &'static str);
    impl Selectable for G {
        fn index(&self) -> u32 {
            self.0
        }
        fn uuid(&self) -> &str {
            self.1
        }
    }

    fn sel(s: Selector) -> GpuSelector {
        GpuSelector { selector: Some(s) }
    }

    const GPUS: [G; 3] = [G(0, "GPU-aaa"), G(1, "GPU-bbb"), G(2, "GPU-ccc")];

    #[test]
    fn empty_means_all_for_reads_and_is_refused_for_control() {
        assert_eq!(
            resolve(&[], &GPUS, Empty::MeansAll).expect("all"),
            [0, 1, 2]
        );
        let err = resolve(&[], &GPUS, Empty::Refused).expect_err("refused");
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(err.message().contains("all"));
    }

    #[test]
    fn index_and_uuid_pick_in_order_without_duplicates() {
        let picked = resolve(
            &[
                sel(Selector::Uuid("gpu-CCC".into())),
                sel(Selector::Index(0)),
                sel(Selector::Index(2)),
            ],
            &GPUS,
            Empty::Refused,
        )
        .expect("valid");
        assert_eq!(picked, [0, 2]);
    }

    #[test]
    fn unknown_gpu_is_not_found_and_lists_the_real_ones() {
        let err = resolve(&[sel(Selector::Index(9))], &GPUS, Empty::MeansAll).expect_err("unknown");
        assert_eq!(err.code(), Code::NotFound);
        assert!(err.message().contains("0, 1, 2"), "{}", err.message());
        let err = resolve(
            &[sel(Selector::Uuid("GPU-zzz".into()))],
            &GPUS,
            Empty::MeansAll,
        )
        .expect_err("unknown");
        assert_eq!(err.code(), Code::NotFound);
        assert!(err.message().contains("GPU-aaa"));
    }

    #[test]
    fn malformed_selectors_are_invalid() {
        for bad in [
            GpuSelector { selector: None },
            sel(Selector::All(false)),
            sel(Selector::Uuid(String::new())),
            sel(Selector::Uuid("x".repeat(MAX_UUID_LEN + 1))),
        ] {
            let err = resolve(&[bad], &GPUS, Empty::MeansAll).expect_err("invalid");
            assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
        }
        let many = vec![sel(Selector::Index(0)); MAX_SELECTORS + 1];
        let err = resolve(&many, &GPUS, Empty::MeansAll).expect_err("too many");
        assert!(err.message().contains(&MAX_SELECTORS.to_string()));
    }
}

//! Who is calling: the identity attached to a request, used as the actor in
//! audit events.
//!
//! The authentication layer (bearer tokens, mTLS) puts a [`Caller`] into the
//! request's extensions; handlers read it back with [`Caller::of`]. Without
//! authentication the caller is "anonymous".

use tonic::Request;

/// What a caller may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    /// ListDevices, GetSnapshot, Watch, WatchEvents, GetPolicy.
    Read,
    /// Everything, including SetPowerLimit, ResetClocks, SetThreshold.
    Control,
}

/// The authenticated identity of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// Token name or certificate subject; "anonymous" without authentication.
    pub name: String,
    pub role: Role,
}

impl Caller {
    /// The caller of an unauthenticated request.
    pub fn anonymous() -> Self {
        Self {
            name: "anonymous".to_owned(),
            role: Role::Control,
        }
    }

    /// The caller attached to `request`, or anonymous.
    pub fn of<T>(request: &Request<T>) -> Self {
        request
            .extensions()
            .get::<Caller>()
            .cloned()
            .unwrap_or_else(Caller::anonymous)
    }
}

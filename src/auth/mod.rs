//! Who is calling: API keys (generated, stored hashed) and the access
//! tokens exchanged for them, the lookup that turns either into an
//! [`AuthContext`] with the caller's organisation, scopes and key limits.

pub mod context;
pub mod keys;
pub mod policy;
pub mod tokens;
pub mod usage_recorder;

pub use context::{presented_key, Auth, AuthContext};
pub use policy::KeyPolicy;

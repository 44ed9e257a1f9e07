//! API keys and who is calling: key generation and storage (hashed), the
//! lookup that turns a presented key into an [`AuthContext`], and scopes.

pub mod context;
pub mod keys;
pub mod usage_recorder;

pub use context::{presented_key, Auth, AuthContext};

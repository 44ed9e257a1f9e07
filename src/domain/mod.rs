//! Types that carry the rules: values parsed at the edge that cannot be
//! invalid afterwards. Handlers and services work only with these.

mod credits;
mod cursor;
mod ids;
mod phone;
mod plan;
mod scope;

pub use credits::Credits;
pub use cursor::{page, Cursor};
pub use ids::{OrgId, AgentId, CallId, KeyId};
pub use phone::PhoneNumber;
pub use plan::Plan;
pub use scope::{Scope, Scopes};

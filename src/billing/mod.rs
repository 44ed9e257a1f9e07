//! Money: the credits ledger (the only way a balance changes) and the usage
//! summary derived from it.

pub mod ledger;
pub mod usage;

pub use ledger::{debit, grant, refund, Debit, IdempotencyKey, Reason, Refund, Spender};

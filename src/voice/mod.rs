//! Voice agents and their calls: the agents an account defines, the call
//! records, the speech engines of this process, and the call manager that
//! runs each call (SIP dialog or CPaaS media stream + media + agent session +
//! billing).

pub mod agents;
pub mod calls;
pub mod engines;
pub mod manager;
pub mod streams;
pub mod twilio;
mod writer;

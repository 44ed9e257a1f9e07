//! Outbound network safety: every URL a user gives us (webhooks, media
//! URLs) goes through [`ssrf::SsrfGuard`] before we connect to it.

pub mod ssrf;

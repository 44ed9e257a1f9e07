//! Per-key request quotas (the contract's "Rate Limiting" table), enforced
//! in memory with `governor`'s GCRA, one keyed limiter per class of endpoint.
//!
//! These short windows are per process by design: they protect the process,
//! and a few extra requests across several processes are harmless. The hourly
//! outbound-call quota is different (it must hold across restarts and
//! processes) and is counted in the database by the call manager.
//!
//! `X-RateLimit-Reset` is the Unix time at which the key's bucket will be
//! full again; `Retry-After` (on 429) is when the next request can pass.

use std::num::NonZeroU32;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::http::{HeaderMap, HeaderValue, Method};
use governor::clock::{Clock, DefaultClock};
use governor::middleware::StateInformationMiddleware;
use governor::state::keyed::DefaultKeyedStateStore;
use governor::{Quota, RateLimiter};

use crate::config::{self, RateLimits};
use crate::domain::KeyId;

/// The classes of the contract's table (plus other writes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateClass {
    Generation,
    Read,
    Write,
    Upload,
    Delete,
}

impl RateClass {
    /// Which quota a request counts against.
    pub fn of(method: &Method, path: &str) -> RateClass {
        if path.starts_with("/api/upload/") {
            RateClass::Upload
        } else if *method == Method::DELETE {
            RateClass::Delete
        } else if *method == Method::POST
            && (path.starts_with("/api/generate/") || path == "/v1/images/generations" || path == "/v1/videos")
        {
            RateClass::Generation
        } else if *method == Method::GET || *method == Method::HEAD {
            RateClass::Read
        } else {
            RateClass::Write
        }
    }
}

type KeyedLimiter =
    RateLimiter<KeyId, DefaultKeyedStateStore<KeyId>, DefaultClock, StateInformationMiddleware>;

struct ClassLimiter {
    limiter: KeyedLimiter,
    quota: Quota,
}

/// What a check decided, with the numbers for the response headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub limit: u32,
    pub remaining: u32,
    /// Unix seconds when the bucket is full again.
    pub reset_unix: u64,
    /// Seconds until a request can pass; `Some` means refused.
    pub retry_after: Option<u64>,
}

impl Decision {
    pub fn write_headers(&self, headers: &mut HeaderMap) {
        headers.insert("x-ratelimit-limit", HeaderValue::from(self.limit));
        headers.insert("x-ratelimit-remaining", HeaderValue::from(self.remaining));
        headers.insert("x-ratelimit-reset", HeaderValue::from(self.reset_unix));
    }
}

pub struct RequestLimiter {
    generation: ClassLimiter,
    read: ClassLimiter,
    write: ClassLimiter,
    upload: ClassLimiter,
    delete: ClassLimiter,
}

fn class_limiter(q: config::Quota) -> ClassLimiter {
    // Validated non-zero in Config::validate; clamp anyway rather than panic.
    let burst = NonZeroU32::new(q.requests.max(1)).unwrap_or(NonZeroU32::MIN);
    let period = Duration::from_secs(u64::from(q.seconds.max(1))) / burst.get();
    let quota = Quota::with_period(period).unwrap_or_else(|| Quota::per_second(burst)).allow_burst(burst);
    ClassLimiter { limiter: RateLimiter::keyed(quota).with_middleware::<StateInformationMiddleware>(), quota }
}

fn ceil_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

impl RequestLimiter {
    pub fn new(cfg: &RateLimits) -> Self {
        RequestLimiter {
            generation: class_limiter(cfg.generation),
            read: class_limiter(cfg.reads),
            write: class_limiter(cfg.writes),
            upload: class_limiter(cfg.uploads),
            delete: class_limiter(cfg.deletes),
        }
    }

    fn class(&self, class: RateClass) -> &ClassLimiter {
        match class {
            RateClass::Generation => &self.generation,
            RateClass::Read => &self.read,
            RateClass::Write => &self.write,
            RateClass::Upload => &self.upload,
            RateClass::Delete => &self.delete,
        }
    }

    /// Counts one request of `key` against `class`.
    pub fn check(&self, class: RateClass, key: KeyId) -> Decision {
        let c = self.class(class);
        let limit = c.quota.burst_size().get();
        let interval = c.quota.replenish_interval();
        let now_unix = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        match c.limiter.check_key(&key) {
            Ok(snapshot) => {
                let remaining = snapshot.remaining_burst_capacity();
                let until_full = interval * (limit - remaining);
                Decision { limit, remaining, reset_unix: ceil_secs(now_unix + until_full), retry_after: None }
            }
            Err(not_until) => {
                let wait = not_until.wait_time_from(c.limiter.clock().now());
                let until_full = wait + interval * (limit - 1);
                Decision {
                    limit,
                    remaining: 0,
                    reset_unix: ceil_secs(now_unix + until_full),
                    retry_after: Some(ceil_secs(wait).max(1)),
                }
            }
        }
    }

    /// Forgets keys whose buckets are full again, so memory tracks active keys.
    pub fn forget_idle(&self) {
        for c in [&self.generation, &self.read, &self.write, &self.upload, &self.delete] {
            c.limiter.retain_recent();
            c.limiter.shrink_to_fit();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_follow_the_contract_table() {
        assert_eq!(RateClass::of(&Method::POST, "/api/generate/image"), RateClass::Generation);
        assert_eq!(RateClass::of(&Method::GET, "/api/jobs"), RateClass::Read);
        assert_eq!(RateClass::of(&Method::POST, "/api/upload/audio"), RateClass::Upload);
        assert_eq!(RateClass::of(&Method::DELETE, "/api/keys/x"), RateClass::Delete);
        assert_eq!(RateClass::of(&Method::POST, "/api/keys"), RateClass::Write);
        assert_eq!(RateClass::of(&Method::POST, "/v1/videos"), RateClass::Generation);
        assert_eq!(RateClass::of(&Method::GET, "/v1/tasks/x"), RateClass::Read);
    }

    #[test]
    fn sixth_generation_request_in_ten_seconds_is_refused() {
        let limiter = RequestLimiter::new(&RateLimits::default());
        let key = KeyId::new();
        for expected_remaining in (0..5).rev() {
            let d = limiter.check(RateClass::Generation, key);
            assert_eq!((d.limit, d.remaining, d.retry_after), (5, expected_remaining, None));
        }
        let refused = limiter.check(RateClass::Generation, key);
        assert_eq!(refused.remaining, 0);
        let retry = refused.retry_after.expect("refused");
        assert!((1..=2).contains(&retry), "one slot frees within 2 s, got {retry}");
        // Other keys and other classes are unaffected.
        assert!(limiter.check(RateClass::Generation, KeyId::new()).retry_after.is_none());
        assert!(limiter.check(RateClass::Read, key).retry_after.is_none());
    }
}

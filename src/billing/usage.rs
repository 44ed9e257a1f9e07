//! Usage for the current billing cycle (the calendar month, UTC), derived
//! from the ledger: what was charged and not refunded, counted by kind.

use serde::Serialize;
use sqlx::Row;

use crate::clock::{month_bounds, now_ms, rfc3339};
use crate::db::Db;
use crate::domain::OrgId;
use crate::Result;

/// Counts of billed operations in the cycle, by kind.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct UsedCounts {
    pub images: u64,
    pub videos: u64,
    pub voices: u64,
    pub voice_clones: u64,
    pub avatars: u64,
    pub clips: u64,
    pub b_rolls: u64,
    pub text_to_videos: u64,
    pub commercials: u64,
    pub translations: u64,
    pub instant_ads: u64,
    pub photoshoots: u64,
    pub call_minutes: u64,
    /// All credits charged in the cycle, net of refunds.
    pub credits_spent: u64,
}

impl UsedCounts {
    fn slot(&mut self, reason: &str) -> Option<&mut u64> {
        Some(match reason {
            "generate.image" => &mut self.images,
            "generate.video" => &mut self.videos,
            "generate.voice" => &mut self.voices,
            "generate.voice-clone" => &mut self.voice_clones,
            "generate.avatar" => &mut self.avatars,
            "generate.clip" => &mut self.clips,
            "generate.b-roll" => &mut self.b_rolls,
            "generate.text2video" => &mut self.text_to_videos,
            "generate.commercial" => &mut self.commercials,
            "generate.translate" => &mut self.translations,
            "generate.instant-ad" => &mut self.instant_ads,
            "generate.photoshoot" => &mut self.photoshoots,
            "call.minute" => &mut self.call_minutes,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct BillingCycle {
    /// RFC 3339, inclusive.
    pub start: String,
    /// RFC 3339, exclusive.
    pub end: String,
}

/// What the account used in the cycle holding `at_ms`.
pub async fn used_in_cycle(db: &Db, account: OrgId, at_ms: i64) -> Result<(UsedCounts, BillingCycle)> {
    let (start, end) = month_bounds(at_ms);
    let rows = sqlx::query(
        "SELECT l.reason, COUNT(*), CAST(COALESCE(SUM(-l.delta), 0) AS BIGINT) FROM ledger l \
         WHERE l.account_id = $1 AND l.delta < 0 AND l.created_at >= $2 AND l.created_at < $3 \
         AND NOT EXISTS (SELECT 1 FROM ledger r WHERE r.account_id = l.account_id AND r.refund_of = l.idempotency_key) \
         GROUP BY l.reason",
    )
    .bind(account.to_string())
    .bind(start)
    .bind(end)
    .fetch_all(&db.pool)
    .await?;
    let mut used = UsedCounts::default();
    for row in rows {
        let reason: String = row.try_get(0)?;
        let count: i64 = row.try_get(1)?;
        let credits: i64 = row.try_get(2)?;
        if let Some(slot) = used.slot(&reason) {
            *slot += count.max(0) as u64;
        }
        used.credits_spent += credits.max(0) as u64;
    }
    Ok((used, BillingCycle { start: rfc3339(start), end: rfc3339(end) }))
}

/// Shorthand for the current cycle.
pub async fn used_now(db: &Db, account: OrgId) -> Result<(UsedCounts, BillingCycle)> {
    used_in_cycle(db, account, now_ms()).await
}

//! `GET /api/usage`: balance, what the current billing cycle used, plan.

use axum::extract::State;
use axum::response::Response;
use serde::Serialize;
use utoipa::ToSchema;

use super::json::{ok, Data};
use crate::auth::Auth;
use crate::billing::usage::{self, BillingCycle, UsedCounts};
use crate::domain::{Credits, Plan, Scope};
use crate::error::ErrorBody;
use crate::state::AppState;
use crate::Result;

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Usage {
    #[schema(value_type = u64)]
    pub credits: Credits,
    pub used: UsedCounts,
    pub plan: Plan,
    pub billing_cycle: BillingCycle,
}

/// Current credit balance, usage counts and billing cycle.
#[utoipa::path(get, path = "/api/usage", tag = "usage",
    responses((status = 200, body = Data<Usage>), (status = 401, body = ErrorBody)))]
pub async fn get_usage(State(state): State<AppState>, Auth(auth): Auth) -> Result<Response> {
    auth.require(Scope::Usage)?;
    let account = crate::orgs::get(&state.db, auth.org).await?;
    let (used, billing_cycle) = usage::used_now(&state.db, auth.org).await?;
    Ok(ok(Usage { credits: account.credits, used, plan: account.plan, billing_cycle }))
}

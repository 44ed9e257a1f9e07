//! Several voxgate processes on one database: each is a node with its own
//! `node_id` that records a heartbeat in the `nodes` table. A node silent
//! for `cluster.dead_after_secs` is dead; a survivor marks it, then closes
//! the calls it was running (`failed`, `node-lost`, billed only the minutes
//! already debited, `call.ended` sent once) and puts its leased jobs back
//! in the queue. Every step is a conditional write, so survivors racing
//! over the same dead node, or one finishing another's interrupted work,
//! do each thing once.
//!
//! What is global lives in the database (credits, the hourly call quota,
//! idempotency keys, the job queue); what a node owns (its calls' media,
//! the short per-key request windows) stays in the process.

use std::time::Duration;

use sqlx::Row;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::clock::now_ms;
use crate::config::ClusterConfig;
use crate::db::Db;
use crate::jobs::queue;
use crate::voice::manager::CallManager;

/// Registers `node_id` as running. Another live process with the same id
/// is refused; a row left by a process that died is taken over once its
/// heartbeat is seen to have stopped.
pub async fn join(db: &Db, node_id: &str, config: &ClusterConfig) -> anyhow::Result<()> {
    let heartbeat = Duration::from_secs(config.heartbeat_secs);
    let previous: Option<(i64, Option<i64>)> = sqlx::query("SELECT heartbeat_at, stopped_at FROM nodes WHERE id = $1")
        .bind(node_id)
        .fetch_optional(&db.pool)
        .await?
        .map(|r| Ok::<_, sqlx::Error>((r.try_get(0)?, r.try_get(1)?)))
        .transpose()?;
    if let Some((beat, None)) = previous {
        if now_ms() - beat < config.dead_after_secs as i64 * 1000 {
            // Fresh heartbeat and no clean stop: a live twin, or this node
            // killed a moment ago. A live one beats again within two periods.
            tracing::info!(node_id, "node id was alive {} ms ago; checking that its process is gone", now_ms() - beat);
            tokio::time::sleep(heartbeat * 2 + Duration::from_millis(200)).await;
            let now_beat: Option<i64> = sqlx::query_scalar("SELECT heartbeat_at FROM nodes WHERE id = $1")
                .bind(node_id)
                .fetch_optional(&db.pool)
                .await?;
            anyhow::ensure!(
                now_beat == Some(beat),
                "node_id '{node_id}' is in use by a running process; give each process sharing the database its own node_id"
            );
        }
    }
    register(db, node_id).await?;
    Ok(())
}

/// Records `node_id` as running from now, clearing a stop or a mark of
/// death left on its row.
async fn register(db: &Db, node_id: &str) -> crate::Result<()> {
    sqlx::query(
        "INSERT INTO nodes (id, started_at, heartbeat_at) VALUES ($1, $2, $2) \
         ON CONFLICT (id) DO UPDATE SET started_at = $2, heartbeat_at = $2, stopped_at = NULL, reaped_at = NULL, \
         reaped_by = NULL, settled_at = NULL",
    )
    .bind(node_id)
    .bind(now_ms())
    .execute(&db.pool)
    .await?;
    Ok(())
}

/// Records a clean stop. A node that leaves calls open behind it is not
/// stopped but dead, and the survivors settle it.
pub async fn leave(db: &Db, node_id: &str) {
    let result = sqlx::query(
        "UPDATE nodes SET stopped_at = $1 WHERE id = $2 \
         AND NOT EXISTS (SELECT 1 FROM calls WHERE node_id = $2 AND ended_at IS NULL)",
    )
    .bind(now_ms())
    .bind(node_id)
    .execute(&db.pool)
    .await;
    if let Err(e) = result {
        tracing::warn!(error = %e, "could not record this node's stop");
    }
}

/// How often a node looks for hang-ups of its calls asked through another.
const HANGUP_POLL: Duration = Duration::from_millis(250);

/// Heartbeats, watches the other nodes, and takes the hang-ups other nodes
/// were asked for, until `shutdown`.
pub fn spawn(db: Db, node_id: String, config: ClusterConfig, calls: CallManager, shutdown: CancellationToken) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(config.heartbeat_secs));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut hangups = tokio::time::interval(HANGUP_POLL);
        hangups.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = hangups.tick() => {
                    // Only a node running calls has any to look for.
                    if calls.active() > 0 {
                        if let Err(e) = calls.take_remote_hangups().await {
                            tracing::warn!(error = %e, "could not look for hang-up requests");
                        }
                    }
                    continue;
                }
                _ = tick.tick() => {}
            }
            match beat(&db, &node_id).await {
                Ok(true) => {}
                Ok(false) => {
                    // Declared dead while cut off from the database: the
                    // survivors closed this node's calls already.
                    tracing::error!("this node was declared dead by another; hanging up its calls and rejoining");
                    calls.hang_up_all().await;
                    if let Err(e) = register(&db, &node_id).await {
                        tracing::error!(error = %e, "could not rejoin");
                    }
                }
                Err(e) => tracing::warn!(error = %e, "heartbeat not recorded"),
            }
            if let Err(e) = reap_dead(&db, &node_id, &config, &calls).await {
                tracing::warn!(error = %e, "could not check the other nodes");
            }
        }
    })
}

/// False when this node's row says it was reaped.
async fn beat(db: &Db, node_id: &str) -> crate::Result<bool> {
    let n = sqlx::query("UPDATE nodes SET heartbeat_at = $1 WHERE id = $2 AND reaped_at IS NULL")
        .bind(now_ms())
        .bind(node_id)
        .execute(&db.pool)
        .await?
        .rows_affected();
    Ok(n == 1)
}

/// Marks every node silent too long as dead, then settles the dead nodes
/// not settled yet (also those whose reaper died half-way).
async fn reap_dead(db: &Db, me: &str, config: &ClusterConfig, calls: &CallManager) -> crate::Result<()> {
    let now = now_ms();
    // The mark is conditional on the heartbeat read: a node that beat again
    // (or restarted under its id) in between is not marked.
    let marked = sqlx::query(
        "UPDATE nodes SET reaped_at = $1, reaped_by = $2, settled_at = NULL \
         WHERE id <> $2 AND stopped_at IS NULL AND reaped_at IS NULL AND heartbeat_at < $3",
    )
    .bind(now)
    .bind(me)
    .bind(now - config.dead_after_secs as i64 * 1000)
    .execute(&db.pool)
    .await?
    .rows_affected();
    if marked > 0 {
        tracing::warn!(nodes = marked, "found dead nodes");
    }
    let dead = sqlx::query("SELECT id, reaped_at, heartbeat_at FROM nodes WHERE reaped_at IS NOT NULL AND settled_at IS NULL")
        .fetch_all(&db.pool)
        .await?;
    for row in dead {
        let node: String = row.try_get("id")?;
        let reaped_at: i64 = row.try_get("reaped_at")?;
        let last_beat: i64 = row.try_get("heartbeat_at")?;
        // Only calls started before the mark: a process that came back
        // under the same id (which clears the mark) keeps its new calls.
        let closed = calls.close_node(&node, reaped_at).await?;
        let requeued = queue::requeue_node(db, &node).await?;
        sqlx::query("UPDATE nodes SET settled_at = $1 WHERE id = $2 AND reaped_at = $3")
            .bind(now_ms())
            .bind(&node)
            .bind(reaped_at)
            .execute(&db.pool)
            .await?;
        tracing::warn!(node_id = %node, silent_ms = reaped_at - last_beat, calls_closed = closed, jobs_requeued = requeued, "dead node settled");
    }
    Ok(())
}

//! The credits ledger under concurrency, on the configured backend: the sum
//! is exact, nothing is spent twice, replays and refunds happen once, and a
//! key's daily cap holds.

mod common;

use std::collections::HashSet;

use common::TestDb;
use voxgate::billing::{self, IdempotencyKey, Reason, Refund};
use voxgate::db::Db;
use voxgate::domain::{Credits, Plan};
use voxgate::Error;

async fn setup(balance: u64) -> (TestDb, Db, voxgate::domain::OrgId) {
    let tdb = TestDb::new().await;
    let db = Db::open(&tdb.url, 16).await.expect("open db");
    let account = voxgate::orgs::create(&db, "Ledger Co", Plan::Enterprise, Credits::new(balance)).await.unwrap();
    (tdb, db, account.id)
}

async fn ledger_sum(db: &Db, account: voxgate::domain::OrgId) -> i64 {
    sqlx::query_scalar::<_, i64>("SELECT CAST(COALESCE(SUM(delta), 0) AS BIGINT) FROM ledger WHERE account_id = $1")
        .bind(account.to_string())
        .fetch_one(&db.pool)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_debits_never_overdraw_and_the_sum_is_exact() {
    let (_tdb, db, account) = setup(1000).await;
    let tasks: Vec<_> = (0..250)
        .map(|i| {
            let db = db.clone();
            tokio::spawn(async move {
                let key = IdempotencyKey::parse(&format!("job-{i}")).unwrap();
                billing::debit(&db, account, Credits::new(7), Reason::Generation("image"), Some("test"), &key, None).await
            })
        })
        .collect();
    let mut ok = 0u64;
    let mut refused = 0u64;
    for t in tasks {
        match t.await.unwrap() {
            Ok(d) => {
                assert!(d.applied);
                ok += 1;
            }
            Err(Error::PaymentRequired { needed: 7, .. }) => refused += 1,
            Err(e) => panic!("unexpected error: {e}"),
        }
    }
    assert_eq!(ok, 1000 / 7, "exactly as many debits as the balance covers");
    assert_eq!(refused, 250 - 1000 / 7);
    let balance = billing::ledger::balance(&db, account).await.unwrap();
    assert_eq!(balance.get(), 1000 - 7 * (1000 / 7));
    assert_eq!(ledger_sum(&db, account).await, balance.get() as i64, "balance equals the ledger sum");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replayed_debits_and_refunds_apply_once() {
    let (_tdb, db, account) = setup(100).await;
    let key = IdempotencyKey::parse("job-replayed").unwrap();
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let (db, key) = (db.clone(), key.clone());
            tokio::spawn(async move { billing::debit(&db, account, Credits::new(30), Reason::CallMinute, None, &key, None).await })
        })
        .collect();
    let mut applied = 0;
    for t in tasks {
        let d = t.await.unwrap().expect("replays succeed");
        assert_eq!(d.amount.get(), 30);
        applied += usize::from(d.applied);
    }
    assert_eq!(applied, 1);
    assert_eq!(billing::ledger::balance(&db, account).await.unwrap().get(), 70);

    // The same key for another amount is a client error, not a second debit.
    let err = billing::debit(&db, account, Credits::new(5), Reason::CallMinute, None, &key, None).await.unwrap_err();
    assert!(matches!(err, Error::BadRequest(_)), "{err}");

    let refunds: Vec<_> = (0..50)
        .map(|_| {
            let (db, key) = (db.clone(), key.clone());
            tokio::spawn(async move { billing::refund(&db, account, &key).await })
        })
        .collect();
    let mut refunded = 0;
    for t in refunds {
        match t.await.unwrap().unwrap() {
            Refund::Refunded(c) => {
                assert_eq!(c.get(), 30);
                refunded += 1;
            }
            Refund::AlreadyRefunded(c) => assert_eq!(c.get(), 30),
            Refund::NoSuchDebit => panic!("the debit exists"),
        }
    }
    assert_eq!(refunded, 1);
    assert_eq!(billing::ledger::balance(&db, account).await.unwrap().get(), 100);
    assert_eq!(ledger_sum(&db, account).await, 100);
    let unknown = IdempotencyKey::parse("never-debited").unwrap();
    assert_eq!(billing::refund(&db, account, &unknown).await.unwrap(), Refund::NoSuchDebit);
}

#[tokio::test]
async fn a_refused_debit_changes_nothing_and_usage_nets_out_refunds() {
    let (_tdb, db, account) = setup(10).await;
    let k1 = IdempotencyKey::parse("img-1").unwrap();
    let k2 = IdempotencyKey::parse("img-2").unwrap();
    let k3 = IdempotencyKey::parse("video-1").unwrap();
    billing::debit(&db, account, Credits::new(4), Reason::Generation("image"), None, &k1, None).await.unwrap();
    billing::debit(&db, account, Credits::new(4), Reason::Generation("image"), None, &k2, None).await.unwrap();
    let err = billing::debit(&db, account, Credits::new(250), Reason::Generation("video"), None, &k3, None).await.unwrap_err();
    assert!(matches!(err, Error::PaymentRequired { needed: 250, balance: 2 }), "{err}");
    billing::refund(&db, account, &k2).await.unwrap();
    // The refused key was not consumed: it works once money is there.
    billing::grant(&db, account, Credits::new(300), &IdempotencyKey::parse("topup").unwrap()).await.unwrap();
    billing::debit(&db, account, Credits::new(250), Reason::Generation("video"), None, &k3, None).await.unwrap();

    let (used, _) = billing::usage::used_now(&db, account).await.unwrap();
    assert_eq!((used.images, used.videos, used.credits_spent), (1, 1, 254));
    assert_eq!(billing::ledger::balance(&db, account).await.unwrap().get(), 10 + 300 - 254);
    let reasons: HashSet<String> = sqlx::query_scalar("SELECT reason FROM ledger WHERE account_id = $1")
        .bind(account.to_string())
        .fetch_all(&db.pool)
        .await
        .unwrap()
        .into_iter()
        .collect();
    assert_eq!(reasons, ["grant", "generate.image", "generate.video", "refund"].iter().map(|s| s.to_string()).collect::<std::collections::HashSet<String>>());
}

#[tokio::test]
async fn debits_and_grants_for_an_unknown_account_are_not_found() {
    let (_tdb, db, _) = setup(10).await;
    let ghost = voxgate::domain::OrgId::new();
    let key = IdempotencyKey::parse("k").unwrap();
    let err = billing::debit(&db, ghost, Credits::new(1), Reason::CallMinute, None, &key, None).await.unwrap_err();
    assert!(matches!(err, Error::NotFound(_)), "{err}");
    let err = billing::grant(&db, ghost, Credits::new(1), &key).await.unwrap_err();
    assert!(matches!(err, Error::NotFound(_)), "{err}");
    assert!(matches!(billing::ledger::balance(&db, ghost).await, Err(Error::NotFound(_))));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_debits_of_a_capped_key_never_pass_its_daily_cap_and_refunds_free_it() {
    use voxgate::auth::keys::{self, NewKey};
    use voxgate::auth::KeyPolicy;
    use voxgate::billing::Spender;
    use voxgate::domain::{KeyId, Scopes};

    let (_tdb, db, account) = setup(10_000).await;
    let policy = KeyPolicy { daily_credit_cap: Some(Credits::new(50)), ..Default::default() };
    let new = NewKey { name: "capped".into(), scopes: Scopes::all(), member: None, policy };
    let (info, _secret) = keys::create(&db, account, new).await.unwrap();
    let spender = Spender { key: info.id.parse::<KeyId>().unwrap(), capped: true };
    let tasks: Vec<_> = (0..40)
        .map(|i| {
            let db = db.clone();
            tokio::spawn(async move {
                let key = IdempotencyKey::parse(&format!("capped-{i}")).unwrap();
                billing::debit(&db, account, Credits::new(10), Reason::Generation("image"), None, &key, Some(spender)).await
            })
        })
        .collect();
    let (mut ok, mut over) = (0, 0);
    for t in tasks {
        match t.await.unwrap() {
            Ok(d) => ok += usize::from(d.applied),
            Err(Error::Forbidden(msg)) => {
                assert!(msg.contains("daily credit cap of 50"), "{msg}");
                over += 1;
            }
            Err(e) => panic!("unexpected error: {e}"),
        }
    }
    assert_eq!((ok, over), (5, 35), "exactly the cap is spent, however the debits interleave");
    assert_eq!(billing::ledger::balance(&db, account).await.unwrap().get(), 10_000 - 50);
    assert_eq!(billing::ledger::cap_headroom(&db, spender.key).await.unwrap(), Some(0));
    // A refund gives the key its credits back for the day.
    let applied: String = sqlx::query_scalar("SELECT idempotency_key FROM ledger WHERE key_id = $1 AND delta < 0 LIMIT 1")
        .bind(spender.key.to_string())
        .fetch_one(&db.pool)
        .await
        .unwrap();
    let refunded = match billing::refund(&db, account, &IdempotencyKey::parse(&applied).unwrap()).await.unwrap() {
        Refund::Refunded(n) => n.get(),
        other => panic!("{other:?}"),
    };
    assert_eq!(refunded, 10);
    assert_eq!(billing::ledger::cap_headroom(&db, spender.key).await.unwrap(), Some(10));
    // Another key of the organisation is not held by this one's cap.
    let key = IdempotencyKey::parse("uncapped").unwrap();
    billing::debit(&db, account, Credits::new(100), Reason::Generation("image"), None, &key, None).await.unwrap();
}

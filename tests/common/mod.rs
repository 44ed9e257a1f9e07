//! Test harness shared by the black-box tests: a database of its own per
//! test (a SQLite file, or a fresh PostgreSQL database when
//! `VG_TEST_BACKEND=postgres`), the real `voxgate` binary started on a
//! free loopback port, and the CLI run against the same database.
#![allow(dead_code)]

pub mod far_end;
pub mod webhook_sink;
pub mod voice;
pub mod sipp;
pub mod upstream;
pub mod stream_phone;
pub mod fake_twilio;
pub mod web_client;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_voxgate");

/// A database that exists for one test and is removed afterwards.
pub struct TestDb {
    pub url: String,
    dir: tempfile::TempDir,
    pg_name: Option<String>,
}

fn pg_admin_url() -> String {
    std::env::var("VG_TEST_PG_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

pub fn backend_is_postgres() -> bool {
    std::env::var("VG_TEST_BACKEND").is_ok_and(|b| b == "postgres")
}

impl TestDb {
    pub async fn new() -> TestDb {
        let dir = tempfile::tempdir().expect("tempdir");
        if backend_is_postgres() {
            use sqlx::Connection;
            let name = format!("vg_test_{}", uuid::Uuid::new_v4().simple());
            let admin = pg_admin_url();
            let mut conn = sqlx::PgConnection::connect(&admin).await.expect("PostgreSQL for tests");
            sqlx::Executor::execute(&mut conn, format!("CREATE DATABASE {name}").as_str()).await.expect("create db");
            let base = admin.rsplit_once('/').map(|(b, _)| b.to_owned()).expect("db url has a path");
            TestDb { url: format!("{base}/{name}"), dir, pg_name: Some(name) }
        } else {
            let url = format!("sqlite://{}/voxgate.db", dir.path().display());
            TestDb { url, dir, pg_name: None }
        }
    }

    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }
}

impl TestDb {
    /// Removes a PostgreSQL test database now, cutting off its clients.
    /// Returns false for SQLite, which cannot be taken away from an open pool.
    pub fn destroy(&mut self) -> bool {
        let Some(name) = self.pg_name.take() else { return false };
        drop_pg_database(name);
        true
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let Some(name) = self.pg_name.take() {
            drop_pg_database(name);
        }
    }
}

/// Runs outside any async context (Drop), so a thread of its own does it.
fn drop_pg_database(name: String) {
    let admin = pg_admin_url();
    let _ = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().ok()?;
        rt.block_on(async {
            use sqlx::Connection;
            let mut conn = sqlx::PgConnection::connect(&admin).await.ok()?;
            sqlx::Executor::execute(&mut conn, format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)").as_str())
                .await
                .ok()
        })
    })
    .join();
}

/// The running server and what a client needs to talk to it.
pub struct TestServer {
    pub base: String,
    /// Where the server's SIP user agent listens.
    pub sip: String,
    pub http: reqwest::Client,
    pub db: TestDb,
    child: Option<Child>,
    env: Vec<(String, String)>,
}

/// The speech models installed by `scripts/setup`.
pub fn models_dir() -> String {
    std::env::var("VOXGATE_MODELS_DIR").unwrap_or_else(|_| format!("{}/models", env!("CARGO_MANIFEST_DIR")))
}

impl TestServer {
    pub async fn start() -> TestServer {
        Self::start_with(&[]).await
    }

    /// Starts with extra environment (e.g. `VOXGATE_RATE_LIMITS__READS__REQUESTS`).
    pub async fn start_with(extra_env: &[(&str, &str)]) -> TestServer {
        Self::start_configured("", extra_env).await
    }

    /// Starts with `toml` as its `voxgate.toml` (trunks and such) and extra
    /// environment. SIP listens on a free port; models load on first use.
    pub async fn start_configured(toml: &str, extra_env: &[(&str, &str)]) -> TestServer {
        let db = TestDb::new().await;
        std::fs::write(db.dir().join("voxgate.toml"), toml).expect("write voxgate.toml");
        let mut env = vec![
            ("DATABASE_URL".to_owned(), db.url.clone()),
            ("VOXGATE_BIND".to_owned(), "127.0.0.1:0".to_owned()),
            ("VOXGATE_SIP__BIND".to_owned(), "127.0.0.1:0".to_owned()),
            ("VOXGATE_AGENTS__MODELS_DIR".to_owned(), models_dir()),
            ("VOXGATE_CALLS__PRELOAD_MODELS".to_owned(), "false".to_owned()),
            ("VOXGATE_LOG__FILTER".to_owned(), "warn".to_owned()),
            // A killed server relaunched on its database waits two
            // heartbeats to be sure its previous process is gone.
            ("VOXGATE_CLUSTER__HEARTBEAT_SECS".to_owned(), "1".to_owned()),
            ("VOXGATE_CLUSTER__DEAD_AFTER_SECS".to_owned(), "3".to_owned()),
            ("VOXGATE_CONFIG".to_owned(), db.dir().join("voxgate.toml").display().to_string()),
        ];
        env.extend(extra_env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let mut server = TestServer { base: String::new(), sip: String::new(), http: reqwest::Client::new(), db, child: None, env };
        server.launch();
        server
    }

    /// Starts the process (again, after a kill) on the same database and config.
    pub fn launch(&mut self) {
        let (db, env) = (&self.db, &self.env);
        let mut child = Command::new(BIN)
            .arg("serve")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .env_remove("RUST_LOG")
            .current_dir(db.dir())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start voxgate");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut base = None;
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(addr) = line.strip_prefix("voxgate listening on ") {
                    base = Some(addr.to_owned());
                }
                if let Some(sip) = line.strip_prefix("voxgate SIP on udp://") {
                    if let Some(base) = base.take() {
                        let _ = tx.send((base, sip.to_owned()));
                    }
                }
            }
        });
        let (base, sip) = rx.recv_timeout(Duration::from_secs(60)).expect("voxgate did not report its addresses");
        self.base = base;
        self.sip = sip;
        self.http = reqwest::Client::builder().timeout(Duration::from_secs(60)).build().expect("client");
        self.child = Some(child);
    }

    /// Another process (node `node_id`) on this server's database, config and
    /// output storage, as a second node behind a load balancer would run.
    pub fn peer(&self, node_id: &str, extra_env: &[(&str, &str)]) -> TestServer {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = TestDb { url: self.db.url.clone(), dir, pg_name: None };
        let mut env = self.env.clone();
        env.push(("VOXGATE_NODE_ID".into(), node_id.into()));
        env.push(("VOXGATE_STORAGE__ROOT".into(), self.db.dir().join("data/outputs").display().to_string()));
        env.extend(extra_env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let mut server = TestServer { base: String::new(), sip: String::new(), http: reqwest::Client::new(), db, child: None, env };
        server.launch();
        server
    }

    /// SIGKILL: the process dies at once, as in a crash.
    pub fn kill(&mut self) {
        kill(&mut self.child);
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// Runs a `voxgate` CLI command against this server's database; returns stdout.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = Command::new(BIN)
            .args(args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .current_dir(self.db.dir())
            .output()
            .expect("run voxgate cli");
        assert!(out.status.success(), "voxgate {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).expect("utf8").trim().to_owned()
    }

    /// Creates an account with the CLI and a `*` key for it; returns (account id, key).
    pub fn account(&self, plan: &str, credits: u64) -> (String, String) {
        let id = self.cli(&["orgs", "create", "--name", "Test Co", "--plan", plan, "--credits", &credits.to_string()]);
        let key = self.cli(&["keys", "create", "--org", &id]);
        (id, key)
    }

    pub fn key_with_scopes(&self, account: &str, scopes: &str) -> String {
        self.cli(&["keys", "create", "--org", account, "--scopes", scopes])
    }

    pub async fn get(&self, path: &str, key: &str) -> reqwest::Response {
        self.http.get(self.url(path)).bearer_auth(key).send().await.expect("request")
    }

    pub async fn post(&self, path: &str, key: &str, body: Value) -> reqwest::Response {
        self.http.post(self.url(path)).bearer_auth(key).json(&body).send().await.expect("request")
    }

    pub async fn delete(&self, path: &str, key: &str) -> reqwest::Response {
        self.http.delete(self.url(path)).bearer_auth(key).send().await.expect("request")
    }

    /// Waits until `/ready` answers 200; meanwhile it may only say that the
    /// speech models are loading.
    pub async fn wait_ready(&self, within: Duration) {
        let deadline = std::time::Instant::now() + within;
        loop {
            let resp = self.http.get(self.url("/ready")).send().await.expect("GET /ready");
            if resp.status() == 200 {
                return;
            }
            let (status, body) = json(resp).await;
            assert_eq!(
                (status, body["error"].as_str(), body["code"].as_str()),
                (503, Some("the speech models are loading"), Some("SERVICE_UNAVAILABLE"))
            );
            assert!(std::time::Instant::now() < deadline, "models still loading after {within:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The server's process id (for tools that sample it).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Sends SIGTERM and waits for the process to exit; returns whether it exited cleanly.
    pub fn terminate(&mut self, within: Duration) -> bool {
        let Some(child) = self.child.take() else { return false };
        let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
        wait_for_exit(child, within)
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        kill(&mut self.child);
    }
}

/// Waits up to `within` for a child to exit (killing it after that);
/// true when it exited with status 0.
pub fn wait_for_exit(mut child: Child, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return status.success();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Kills and reaps a child that is still owned, so no test leaves one behind.
pub fn kill(child: &mut Option<Child>) {
    if let Some(mut child) = child.take() {
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// Status and JSON body of a response.
pub async fn json(resp: reqwest::Response) -> (u16, Value) {
    let status = resp.status().as_u16();
    let text = resp.text().await.expect("body");
    let body = serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"));
    (status, body)
}

/// Polls a job until it completes or fails (or `within` passes); returns it.
pub async fn wait_job(server: &TestServer, key: &str, id: &str, within: Duration) -> Value {
    let deadline = Instant::now() + within;
    loop {
        let (status, body) = json(server.get(&format!("/api/jobs?id={id}"), key).await).await;
        assert_eq!(status, 200, "{body}");
        let job = body["data"].clone();
        if job["status"] == "completed" || job["status"] == "failed" || Instant::now() > deadline {
            return job;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Asserts the contract's error shape and returns the message.
pub async fn expect_error(resp: reqwest::Response, status: u16, code: &str) -> String {
    let (got, body) = json(resp).await;
    assert_eq!(got, status, "status for {body}");
    assert_eq!(body["code"], code, "code in {body}");
    let obj = body.as_object().expect("object");
    assert_eq!(obj.len(), 2, "error body has exactly error and code: {body}");
    let msg = body["error"].as_str().expect("error is a string").to_owned();
    assert!(!msg.is_empty());
    msg
}

//! Call setup rate against a SIPp UAS: dials `calls` calls at `rate` per
//! second, hangs each up with BYE as soon as it is answered, and reports
//! setup time (INVITE sent -> 200 received) percentiles and the rate of
//! completed calls.
//!
//! sipp -sn uas -i 127.0.0.1 -p 5090 -mi 127.0.0.1 &
//! cargo run --release -p voxgate-sip --example cps -- 127.0.0.1:5090 <calls> <rate>

use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use voxgate_sip::{CallEvent, CallStatus, Dial, SipAgent, SipConfig, Trunk};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let target: std::net::SocketAddr = args.get(1).and_then(|a| a.parse().ok()).expect("SIPp address, e.g. 127.0.0.1:5090");
    let calls: usize = args.get(2).and_then(|v| v.parse().ok()).unwrap_or(1000);
    let rate: u64 = args.get(3).and_then(|v| v.parse().ok()).unwrap_or(100);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    rt.block_on(async move {
        let config = SipConfig {
            bind: "127.0.0.1:0".parse().unwrap(),
            rtp_port_min: 20000,
            rtp_port_max: 60000,
            trunks: vec![Trunk {
                name: "sipp".into(),
                host: target.ip().to_string(),
                port: target.port(),
                transport: Default::default(),
                username: None,
                password: None,
                from_user: None,
                outbound_proxy: None,
            }],
            ..SipConfig::default()
        };
        let cancel = CancellationToken::new();
        let (agent, _inbound) = SipAgent::start(config, cancel.clone()).await.expect("agent");
        let started = Instant::now();
        let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / rate.max(1)));
        let mut tasks = Vec::with_capacity(calls);
        for i in 0..calls {
            tick.tick().await;
            let agent = agent.clone();
            tasks.push(tokio::spawn(async move {
                let t0 = Instant::now();
                let mut call = agent.dial(Dial { trunk: None, number: format!("+1415555{:04}", i % 10_000) }).await.ok()?;
                let mut setup = None;
                while let Some(ev) = call.events.recv().await {
                    match ev {
                        CallEvent::Answered { at } => {
                            setup = Some(at - t0);
                            call.hangup().await;
                        }
                        CallEvent::Ended(o) => return (o.status == CallStatus::Completed).then_some(setup?),
                        _ => {}
                    }
                }
                None
            }));
        }
        let mut setups: Vec<Duration> = Vec::new();
        for t in tasks {
            if let Ok(Some(d)) = t.await {
                setups.push(d);
            }
        }
        let elapsed = started.elapsed().as_secs_f64();
        setups.sort();
        let pct = |p: f64| setups.get(((setups.len().max(1) - 1) as f64 * p) as usize).copied().unwrap_or_default();
        println!("offered: {calls} calls at {rate}/s; completed: {} in {:.2} s = {:.1} calls/s", setups.len(), elapsed, setups.len() as f64 / elapsed);
        println!("setup (INVITE -> 200): p50 {:?}, p95 {:?}, p99 {:?}, max {:?}", pct(0.5), pct(0.95), pct(0.99), pct(1.0));
        cancel.cancel();
    });
}

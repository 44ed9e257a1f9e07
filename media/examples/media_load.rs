//! Media engine load: N concurrent RTP sessions on loopback, each receiving
//! and sending 50 packets/s with G.711 decode, jitter buffer, resampling to
//! 16 kHz and back, and encode. Every session under test talks to a peer
//! session, so the process runs 2N sessions; figures are per session.
//!
//! cargo run --release -p voxgate-media --example media_load -- <sessions> <seconds>
//!
//! With `floor` after the seconds it measures instead what no media engine
//! can save: the kernel's part. The same 2N sockets in pairs, each sending
//! one 172-byte datagram (a PCMU packet's size) every 20 ms and reading what
//! came, from one thread with no audio work, no runtime and no wake-ups.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use voxgate_media::sdp::{Codec, Direction, RemoteMedia, TELEPHONE_EVENT_PT};
use voxgate_media::session::{self, MediaHandle, PortRange, SessionConfig};

fn remote_for(addr: SocketAddr) -> RemoteMedia {
    RemoteMedia {
        rtp: Some(addr),
        rtcp: Some(SocketAddr::new(addr.ip(), addr.port() + 1)),
        codec: Codec::Pcmu,
        payload_type: 0,
        dtmf_payload_type: Some(TELEPHONE_EVENT_PT),
        direction: Direction::SendRecv,
        ptime_ms: 20,
    }
}

/// Process CPU time (user + system) from /proc/self/stat, in seconds.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit(')').next().unwrap_or_default();
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = fields.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0)
        + fields.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    ticks / 100.0
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

fn drain(mut h: MediaHandle) -> MediaHandle {
    let (mut incoming, mut events) = (std::mem::replace(&mut h.incoming, tokio::sync::mpsc::channel(1).1), std::mem::replace(&mut h.events, tokio::sync::mpsc::channel(1).1));
    tokio::spawn(async move { while incoming.recv().await.is_some() {} });
    tokio::spawn(async move { while events.recv().await.is_some() {} });
    h
}

/// Plain UDP at the legs' rate: the kernel's cost of sending and receiving
/// 50 packets a second on each of `2 * n` sockets.
fn floor(n: usize, seconds: u64) {
    let sockets: Vec<std::net::UdpSocket> = (0..2 * n)
        .map(|_| {
            let s = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
            s.set_nonblocking(true).expect("non-blocking");
            s
        })
        .collect();
    let peers: Vec<SocketAddr> = sockets.iter().map(|s| s.local_addr().expect("bound")).collect();
    let (packet, mut buf) = ([0x80u8; 172], [0u8; 2048]);
    let warmup = 100u32;
    let ticks = warmup + u32::try_from(seconds * 50).unwrap_or(u32::MAX);
    let start = Instant::now();
    let (mut cpu0, mut t0, mut received) = (cpu_seconds(), start, 0u64);
    for tick in 1..=ticks {
        // Drift-free: each tick is due 20 ms after the last one was.
        if let Some(wait) = (start + Duration::from_millis(20) * tick).checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        if tick == warmup {
            (cpu0, t0, received) = (cpu_seconds(), Instant::now(), 0);
        }
        for (i, s) in sockets.iter().enumerate() {
            let _ = s.send_to(&packet, peers[i ^ 1]);
        }
        for s in &sockets {
            while s.recv_from(&mut buf).is_ok() {
                received += 1;
            }
        }
    }
    let (cpu, elapsed) = (cpu_seconds() - cpu0, t0.elapsed().as_secs_f64());
    let expected = (2 * n) as f64 * elapsed * 50.0;
    println!("plain UDP, {} sockets in pairs, one thread, measured {:.1} s", 2 * n, elapsed);
    println!("CPU: {:.1} % of one core in all, {:.4} % per socket", cpu / elapsed * 100.0, cpu / elapsed * 100.0 / (2 * n) as f64);
    println!("packets received: {received} of {expected:.0} expected ({:.3} %; under 100 % the one thread fell behind)", received as f64 * 100.0 / expected);
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let n: usize = args.get(1).and_then(|v| v.parse().ok()).unwrap_or(200);
    let seconds: u64 = args.get(2).and_then(|v| v.parse().ok()).unwrap_or(20);
    if args.get(3).is_some_and(|a| a == "floor") {
        floor(n, seconds);
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    rt.block_on(async move {
        let ports = PortRange::new("127.0.0.1".parse().unwrap(), 20000, 60000);
        let rss_before = rss_kib();
        let mut sessions = Vec::with_capacity(2 * n);
        for _ in 0..n {
            let a = ports.bind().await.expect("ports");
            let b = ports.bind().await.expect("ports");
            let (a_addr, b_addr) = (a.0.local_addr().unwrap(), b.0.local_addr().unwrap());
            sessions.push(drain(session::start(a, Some(remote_for(b_addr)), SessionConfig::default()).unwrap()));
            sessions.push(drain(session::start(b, Some(remote_for(a_addr)), SessionConfig::default()).unwrap()));
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        let rss_running = rss_kib();
        let baseline: Vec<_> = sessions.iter().map(|s| s.control.stats()).collect();
        let (cpu0, t0) = (cpu_seconds(), Instant::now());
        tokio::time::sleep(Duration::from_secs(seconds)).await;
        let (cpu1, elapsed) = (cpu_seconds(), t0.elapsed().as_secs_f64());
        let stats: Vec<_> = sessions.iter().map(|s| s.control.stats()).collect();
        let received: u64 = stats.iter().zip(&baseline).map(|(s, b)| s.packets_received - b.packets_received).sum();
        let expected = (2 * n) as f64 * elapsed * 50.0;
        let lost: u64 = stats.iter().zip(&baseline).map(|(s, b)| s.jitter.lost - b.jitter.lost).sum();
        let lost_at_start: u64 = baseline.iter().map(|b| b.jitter.lost).sum();
        let late: u64 = stats.iter().zip(&baseline).map(|(s, b)| s.jitter.late - b.jitter.late).sum();
        let concealed: u64 = stats.iter().zip(&baseline).map(|(s, b)| s.jitter.concealed - b.jitter.concealed).sum();
        let dropped: u64 = stats.iter().map(|s| s.dropped_frames).sum();
        let mut jitters: Vec<f64> = stats.iter().map(|s| s.jitter.jitter_ms).collect();
        jitters.sort_by(|a, b| a.total_cmp(b));
        let pct = |p: f64| jitters[((jitters.len() - 1) as f64 * p) as usize];
        let cpu_per_session = (cpu1 - cpu0) / elapsed / (2 * n) as f64 * 100.0;
        println!("sessions: {} ({} calls and their peers), measured {:.1} s", 2 * n, n, elapsed);
        println!("CPU: {:.1} % of one core in all, {:.4} % per session -> {:.0} sessions per core", (cpu1 - cpu0) / elapsed * 100.0, cpu_per_session, 100.0 / cpu_per_session);
        println!("packets received: {received} of {:.0} expected ({:.3} %)", expected, received as f64 * 100.0 / expected);
        println!("in the measured window: lost {lost}, late {late}, concealed ticks {concealed}; frames dropped by a slow consumer: {dropped}");
        println!("lost while the {} sessions were being set up: {lost_at_start}", 2 * n);
        println!("jitter ms: p50 {:.2}, p95 {:.2}, p99 {:.2}, max {:.2}", pct(0.5), pct(0.95), pct(0.99), pct(1.0));
        println!("RSS: {} KiB before, {} KiB with sessions running: {:.0} KiB per session", rss_before, rss_running, (rss_running.saturating_sub(rss_before)) as f64 / (2 * n) as f64);
        for s in sessions {
            s.stop().await;
        }
    });
}

//! SIPp as the far end of SIP tests: started on 127.0.0.1 with free ports,
//! a bounded run time, and killed when dropped.
#![allow(dead_code)]

use std::net::{SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use voxgate_sip::{SipConfig, Trunk};

/// A free UDP port pair base on 127.0.0.1 (even, with the next one free too).
pub fn free_udp_port() -> u16 {
    free_udp_range(1)
}

/// The first of `len + 1` consecutive free UDP ports on 127.0.0.1 (even),
/// reserved for this test process: nextest runs every test in a process of
/// its own, and a port picked here is bound later (SIPp starts, a server
/// reads its config), so until then another test could pick it too.
pub fn free_udp_range(len: u16) -> u16 {
    loop {
        let s = UdpSocket::bind("127.0.0.1:0").expect("bind");
        let port = s.local_addr().unwrap().port();
        if !port.is_multiple_of(2) || port >= 65000 - len {
            continue;
        }
        drop(s);
        let ports = port..=port + len;
        if ports.clone().all(|p| UdpSocket::bind(("127.0.0.1", p)).is_ok()) && reserve(ports) {
            return port;
        }
    }
}

/// Locks `/tmp/voxgate-test-ports/<port>` for every port in `ports` until
/// this process exits (the kernel drops the locks with it); false, holding
/// none, when another process holds one of them.
fn reserve(ports: std::ops::RangeInclusive<u16>) -> bool {
    static HELD: std::sync::Mutex<Vec<std::fs::File>> = std::sync::Mutex::new(Vec::new());
    let dir = std::env::temp_dir().join("voxgate-test-ports");
    let _ = std::fs::create_dir_all(&dir);
    let mut locked = Vec::new();
    for port in ports {
        let file = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(dir.join(port.to_string())).expect("port lock file");
        if file.try_lock().is_err() {
            return false;
        }
        locked.push(file);
    }
    HELD.lock().unwrap().extend(locked);
    true
}

/// A directory whose `pcap/` is SIPp's shipped audio and DTMF captures, for
/// scenarios that `play_pcap_audio="pcap/..."`.
fn workdir(port: u16) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sipp-{port}"));
    let _ = std::fs::create_dir_all(&dir);
    let _ = std::os::unix::fs::symlink("/usr/share/sip-tester", dir.join("pcap"));
    dir
}

pub fn scenario(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/sipp").join(name)
}

pub struct Sipp {
    child: Option<Child>,
    pub addr: SocketAddr,
    pub media_port: u16,
    error_file: PathBuf,
}

impl Sipp {
    /// A UAS: `scenario` is a built-in name (`uas`) or a path to an XML file.
    pub fn uas(scenario: &str, extra: &[&str]) -> Sipp {
        let scenario_args = if scenario.ends_with(".xml") { ["-sf", scenario] } else { ["-sn", scenario] };
        let sipp = Sipp::spawn(&scenario_args, extra);
        // Let SIPp bind before anything is sent to it.
        std::thread::sleep(Duration::from_millis(300));
        sipp
    }

    /// A UAC calling `target` (user `number`) with a built-in scenario
    /// (`uac`, or `uac_pcap`, which plays the shipped `g711a.pcap` and then
    /// `dtmf_2833_1.pcap`) or an XML file.
    pub fn uac(scenario: &str, target: SocketAddr, number: &str, extra: &[&str]) -> Sipp {
        let kind = if scenario.ends_with(".xml") { "-sf" } else { "-sn" };
        Sipp::spawn(&[kind, scenario, &target.to_string(), "-s", number], extra)
    }

    /// Starts SIPp on free loopback ports for one call, bounded to 60 s.
    fn spawn(scenario_args: &[&str], extra: &[&str]) -> Sipp {
        let port = free_udp_port();
        let media_port = free_udp_port();
        let error_path = std::env::temp_dir().join(format!("sipp-{port}-err.log"));
        let _ = std::fs::remove_file(&error_path);
        let error_file = error_path.display().to_string();
        let (port_s, media_s) = (port.to_string(), media_port.to_string());
        let common = [
            "-i", "127.0.0.1", "-p", &port_s, "-mi", "127.0.0.1", "-mp", &media_s, "-m", "1", "-timeout", "60s",
            "-timeout_error", "-nostdin", "-trace_err", "-error_file", &error_file,
        ];
        let child = Command::new("sipp")
            .args(scenario_args)
            .args(common)
            .args(extra)
            .current_dir(workdir(port))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("sipp (Debian package sip-tester) is installed by scripts/setup");
        Sipp { child: Some(child), addr: SocketAddr::from(([127, 0, 0, 1], port)), media_port, error_file: error_path }
    }

    /// What SIPp reported as unexpected so far (its `-trace_err` file), for
    /// a failing test to show.
    pub fn errors(&self) -> String {
        std::fs::read_to_string(&self.error_file).unwrap_or_else(|_| "(none)".into())
    }

    /// Waits for SIPp to finish; true when its one call succeeded (exit 0).
    pub fn wait(&mut self, within: Duration) -> bool {
        self.child.take().is_some_and(|child| super::wait_for_exit(child, within))
    }
}

impl Drop for Sipp {
    fn drop(&mut self) {
        super::kill(&mut self.child);
    }
}

/// SIP config for voxgate answering inbound calls to `number`, no trunks.
pub fn inbound_config(number: &str) -> SipConfig {
    let rtp = free_udp_range(20);
    SipConfig {
        bind: SocketAddr::from(([127, 0, 0, 1], free_udp_port())),
        rtp_port_min: rtp,
        rtp_port_max: rtp + 20,
        inbound_numbers: vec![number.into()],
        ..SipConfig::default()
    }
}

/// SIP config for voxgate with one trunk pointing at `sipp`.
pub fn config_for(sipp: &Sipp) -> SipConfig {
    let rtp = free_udp_range(20);
    SipConfig {
        bind: SocketAddr::from(([127, 0, 0, 1], free_udp_port())),
        rtp_port_min: rtp,
        rtp_port_max: rtp + 20,
        trunks: vec![Trunk {
            name: "sipp".into(),
            host: "127.0.0.1".into(),
            port: sipp.addr.port(),
            transport: Default::default(),
            username: None,
            password: None,
            from_user: Some("+14155550100".into()),
            outbound_proxy: None,
        }],
        ..SipConfig::default()
    }
}

/// A SIPp UAS running `scenario_file` whose media goes to `far` (the
/// scenarios read the port as `[sink_port]`).
pub fn uas_with_far_end(scenario_file: &str, far: &super::far_end::FarEnd) -> Sipp {
    Sipp::uas(scenario(scenario_file).to_str().unwrap(), &["-key", "sink_port", &far.port.to_string()])
}

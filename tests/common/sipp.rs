//! SIPp as the far end of SIP tests: started on 127.0.0.1 with free ports,
//! a bounded run time, and killed when dropped.
#![allow(dead_code)]

use std::net::{SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use voxgate_sip::{SipConfig, Trunk};

/// A free UDP port pair base on 127.0.0.1 (even, with the next one free too).
pub fn free_udp_port() -> u16 {
    loop {
        let s = UdpSocket::bind("127.0.0.1:0").expect("bind");
        let port = s.local_addr().unwrap().port();
        if port % 2 == 0 && port < 65000 && UdpSocket::bind(("127.0.0.1", port + 1)).is_ok() {
            return port;
        }
    }
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
}

impl Sipp {
    /// A UAS: `scenario` is a built-in name (`uas`) or a path to an XML file.
    pub fn uas(scenario: &str, extra: &[&str]) -> Sipp {
        let port = free_udp_port();
        let media_port = free_udp_port();
        let mut args: Vec<String> = if scenario.ends_with(".xml") {
            vec!["-sf".into(), scenario.into()]
        } else {
            vec!["-sn".into(), scenario.into()]
        };
        args.extend(
            [
                "-i", "127.0.0.1", "-p", &port.to_string(), "-mi", "127.0.0.1", "-mp", &media_port.to_string(),
                "-m", "1", "-timeout", "60s", "-timeout_error", "-nostdin", "-trace_err",
                "-error_file", &std::env::temp_dir().join(format!("sipp-{port}-err.log")).display().to_string(),
            ]
            .map(String::from),
        );
        args.extend(extra.iter().map(|s| s.to_string()));
        let child = Command::new("sipp")
            .args(&args)
            .current_dir(workdir(port))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("sipp (Debian package sip-tester) is installed by scripts/setup");
        // Let SIPp bind before anything is sent to it.
        std::thread::sleep(Duration::from_millis(300));
        Sipp { child: Some(child), addr: SocketAddr::from(([127, 0, 0, 1], port)), media_port }
    }

    /// A UAC calling `target` (user `number`) with a built-in scenario
    /// (`uac`, or `uac_pcap`, which plays the shipped `g711a.pcap` and then
    /// `dtmf_2833_1.pcap`).
    pub fn uac(scenario: &str, target: SocketAddr, number: &str, extra: &[&str]) -> Sipp {
        let port = free_udp_port();
        let media_port = free_udp_port();
        let mut args: Vec<String> = vec!["-sn".into(), scenario.into(), target.to_string()];
        args.extend(
            [
                "-s", number, "-i", "127.0.0.1", "-p", &port.to_string(), "-mi", "127.0.0.1", "-mp",
                &media_port.to_string(), "-m", "1", "-timeout", "60s", "-timeout_error", "-nostdin",
            ]
            .map(String::from),
        );
        args.extend(extra.iter().map(|s| s.to_string()));
        let child = Command::new("sipp")
            .args(&args)
            .current_dir(workdir(port))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("sipp");
        Sipp { child: Some(child), addr: SocketAddr::from(([127, 0, 0, 1], port)), media_port }
    }

    /// Waits for SIPp to finish; true when its one call succeeded (exit 0).
    pub fn wait(&mut self, within: Duration) -> bool {
        let Some(mut child) = self.child.take() else { return false };
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
}

impl Drop for Sipp {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// SIP config for voxgate with one trunk pointing at `sipp`.
pub fn config_for(sipp: &Sipp) -> SipConfig {
    let rtp = free_udp_port();
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

//! The far end's media in call tests: an RTP peer on 127.0.0.1 that records
//! what voxgate sends (PCMU, decoded) and speaks queued audio at the 20 ms
//! pace of a phone, silence otherwise. SIPp does the signalling and points
//! its SDP here (`-key sink_port <port>`).
#![allow(dead_code)]

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::UdpSocket;
use voxgate_media::g711::{linear_to_ulaw, ulaw_to_linear};

/// 20 ms at 8 kHz.
const FRAME: usize = 160;

#[derive(Default)]
struct State {
    /// Everything received, 8 kHz, in arrival order.
    received: Vec<i16>,
    to_send: VecDeque<i16>,
    remote: Option<SocketAddr>,
    packets: u64,
}

pub struct FarEnd {
    pub port: u16,
    state: Arc<Mutex<State>>,
    task: tokio::task::JoinHandle<()>,
}

impl FarEnd {
    pub async fn start() -> FarEnd {
        let socket = UdpSocket::bind(("127.0.0.1", super::sipp::free_udp_port())).await.expect("bind RTP");
        let port = socket.local_addr().unwrap().port();
        let state = Arc::new(Mutex::new(State::default()));
        let task = tokio::spawn(run(socket, state.clone()));
        FarEnd { port, state, task }
    }

    /// Queues 16 kHz speech to send (downsampled to 8 kHz).
    pub fn say(&self, pcm16k: &[i16]) {
        let mut s = self.state.lock().unwrap();
        s.to_send.extend(pcm16k.chunks(2).map(|c| ((c[0] as i32 + *c.get(1).unwrap_or(&c[0]) as i32) / 2) as i16));
    }

    pub fn speaking(&self) -> bool {
        !self.state.lock().unwrap().to_send.is_empty()
    }

    pub fn packets(&self) -> u64 {
        self.state.lock().unwrap().packets
    }

    /// Samples received so far (8 kHz).
    pub fn received_len(&self) -> usize {
        self.state.lock().unwrap().received.len()
    }

    /// Received audio from sample `from` on, upsampled to 16 kHz floats for Whisper.
    pub fn received_16k(&self, from: usize) -> Vec<f32> {
        let s = self.state.lock().unwrap();
        to_16k(&s.received[from.min(s.received.len())..])
    }

    /// Waits until voxgate has spoken (from sample `from` on) and then been
    /// quiet for `quiet`; returns the sample index where the speech ended.
    pub async fn wait_for_speech_then_silence(&self, from: usize, quiet: Duration, within: Duration) -> Option<usize> {
        super::voice::poll(within, || speech_end(&self.state.lock().unwrap().received, from, quiet)).await
    }
}

/// 8 kHz audio upsampled to 16 kHz floats for Whisper.
pub fn to_16k(src: &[i16]) -> Vec<f32> {
    let mut out = Vec::with_capacity(src.len() * 2);
    for (i, &x) in src.iter().enumerate() {
        let next = *src.get(i + 1).unwrap_or(&x);
        out.push(x as f32 / 32768.0);
        out.push((x as f32 + next as f32) / 2.0 / 32768.0);
    }
    out
}

/// Where speech that began at or after sample `from` of 8 kHz `received`
/// ended, once `quiet` of silence has followed it.
pub fn speech_end(received: &[i16], from: usize, quiet: Duration) -> Option<usize> {
    let quiet_samples = quiet.as_millis() as usize * 8;
    let audio = &received[from.min(received.len())..];
    let frames: Vec<bool> = audio.chunks(FRAME).map(loud).collect();
    let first = frames.iter().position(|l| *l)?;
    let last = frames.iter().rposition(|l| *l).unwrap_or(first);
    let end = from + (last + 1) * FRAME;
    (received.len() >= end + quiet_samples).then_some(end)
}

/// Whether a frame holds speech (RMS above the line noise of G.711 silence).
pub fn loud(frame: &[i16]) -> bool {
    let energy: f64 = frame.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>() / frame.len().max(1) as f64;
    energy.sqrt() > 300.0
}

impl Drop for FarEnd {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn run(socket: UdpSocket, state: Arc<Mutex<State>>) {
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    let mut buf = [0u8; 2048];
    let (mut seq, mut ts, ssrc) = (1u16, 0u32, 0x5eed_f00du32);
    loop {
        tokio::select! {
            r = socket.recv_from(&mut buf) => {
                let Ok((n, from)) = r else { continue };
                if n < 12 || buf[0] >> 6 != 2 {
                    continue;
                }
                let csrc = (buf[0] & 0x0f) as usize * 4;
                let mut start = 12 + csrc;
                if buf[0] & 0x10 != 0 && n >= start + 4 {
                    start += 4 + 4 * u16::from_be_bytes([buf[start + 2], buf[start + 3]]) as usize;
                }
                if buf[1] & 0x7f != 0 || start > n {
                    continue;
                }
                let mut s = state.lock().unwrap();
                s.remote.get_or_insert(from);
                s.packets += 1;
                s.received.extend(buf[start..n].iter().map(|&c| ulaw_to_linear(c)));
            }
            _ = tick.tick() => {
                let (remote, payload) = {
                    let mut s = state.lock().unwrap();
                    let Some(remote) = s.remote else { continue };
                    let n = s.to_send.len().min(FRAME);
                    let mut frame: Vec<i16> = s.to_send.drain(..n).collect();
                    frame.resize(FRAME, 0);
                    (remote, frame.iter().map(|&x| linear_to_ulaw(x)).collect::<Vec<u8>>())
                };
                let mut packet = Vec::with_capacity(12 + FRAME);
                packet.extend_from_slice(&[0x80, 0x00]);
                packet.extend_from_slice(&seq.to_be_bytes());
                packet.extend_from_slice(&ts.to_be_bytes());
                packet.extend_from_slice(&ssrc.to_be_bytes());
                packet.extend_from_slice(&payload);
                let _ = socket.send_to(&packet, remote).await;
                seq = seq.wrapping_add(1);
                ts = ts.wrapping_add(FRAME as u32);
            }
        }
    }
}

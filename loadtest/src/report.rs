//! The run's report: every call's raw samples and the timeline (JSON), a
//! summary with percentiles (Markdown), and plots (SVG): the latency
//! histogram and CDF, and latency against concurrent calls over time.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context;
use plotters::prelude::*;
use serde::Serialize;

use crate::api::Refusal;
use crate::options::{Mode, Options};
use crate::script::Heard;

/// How a call went, from the caller's side.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "result", rename_all = "kebab-case")]
pub enum Outcome {
    /// Our SIP side answered it (whatever happened afterwards).
    Answered,
    /// voxgate's API did not place it.
    Refused(Refusal),
    /// voxgate accepted it but no INVITE reached us in time.
    NoInvite,
    /// The INVITE came but the call ended before we answered.
    NotAnswered { reason: String },
}

#[derive(Debug, Clone, Serialize)]
pub struct CallRecord {
    pub index: u32,
    pub number: String,
    pub call_id: Option<String>,
    #[serde(flatten)]
    pub outcome: Outcome,
    /// From the start of the run.
    pub started_ms: f64,
    pub ended_ms: f64,
    /// API request -> our 180 (or our 200 when not ringing).
    pub post_dial_delay_ms: Option<f64>,
    pub heard: Option<Heard>,
}

impl CallRecord {
    pub fn new(index: u32, number: String, started_ms: f64) -> CallRecord {
        CallRecord { index, number, call_id: None, outcome: Outcome::NoInvite, started_ms, ended_ms: started_ms, post_dial_delay_ms: None, heard: None }
    }

    fn failure(&self) -> Option<String> {
        match &self.outcome {
            Outcome::Answered => None,
            Outcome::Refused(r) => Some(format!("api {} {}", r.status, r.code)),
            Outcome::NoInvite => Some("no INVITE".into()),
            Outcome::NotAnswered { reason } => Some(format!("ended before answer: {reason}")),
        }
    }
}

/// One second of the run.
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    pub at_ms: f64,
    pub active: u32,
    pub answered: u32,
    pub failed: u32,
    pub server_cpu_percent: Option<f64>,
    pub server_rss_mb: Option<f64>,
    pub loadtest_cpu_percent: Option<f64>,
    pub loadtest_rss_mb: Option<f64>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Stat {
    pub n: usize,
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
    pub max: f64,
    pub mean: f64,
}

impl Stat {
    pub fn of(values: &[f64]) -> Option<Stat> {
        Some(Stat {
            n: values.len(),
            p50: percentile(values, 50.0)?,
            p95: percentile(values, 95.0)?,
            p99: percentile(values, 99.0)?,
            max: values.iter().copied().fold(f64::MIN, f64::max),
            mean: values.iter().sum::<f64>() / values.len() as f64,
        })
    }
}

/// Nearest-rank percentile (`p` in 0-100); None for no values.
pub fn percentile(values: &[f64], p: f64) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct RtpTotals {
    pub packets_sent: u64,
    pub packets_received: u64,
    pub lost: u64,
    /// Lost over expected, all calls together.
    pub loss_percent: f64,
    pub out_of_order: u64,
    pub late: u64,
    pub duplicates: u64,
    /// Answered calls that lost at least one packet.
    pub calls_with_loss: u32,
}

/// CPU and memory of a process over the run.
#[derive(Debug, Clone, Serialize)]
pub struct ResourceUse {
    pub rss_mb_start: f64,
    pub rss_mb_peak: f64,
    /// Mean CPU (percent of one core) while at least 90 % of the peak
    /// number of calls was up.
    pub cpu_percent_at_peak: Option<f64>,
    /// The same divided by the calls up then.
    pub cpu_percent_per_call: Option<f64>,
    /// (peak RSS - RSS at start) / peak calls.
    pub rss_mb_per_call: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub placed: u32,
    pub answered: u32,
    /// Answer-seizure ratio: answered / placed, in percent.
    pub answer_seizure_ratio: f64,
    pub failures: BTreeMap<String, u32>,
    pub max_concurrent: u32,
    /// Latencies in milliseconds by name.
    pub metrics: BTreeMap<String, Stat>,
    /// Turns whose answer (or echo) never came.
    pub turns_without_reply: u32,
    pub rtp: RtpTotals,
    pub server: Option<ResourceUse>,
    pub loadtest: Option<ResourceUse>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub mode: Mode,
    pub started_unix: u64,
    pub duration_ms: f64,
    pub agent: String,
    pub options: BTreeMap<&'static str, String>,
    pub summary: Summary,
    pub calls: Vec<CallRecord>,
    pub timeline: Vec<Sample>,
}

/// The name of the per-turn latency in this mode.
fn turn_metric(mode: Mode) -> &'static str {
    match mode {
        Mode::Agent => "voice_to_voice_ms",
        Mode::Media => "echo_round_trip_ms",
    }
}

impl Report {
    pub fn new(o: &Options, agent: String, started_unix: u64, duration_ms: f64, calls: Vec<CallRecord>, timeline: Vec<Sample>) -> Report {
        let options = BTreeMap::from([
            ("transport", format!("{:?}", o.transport).to_lowercase()),
            ("calls", o.calls.to_string()),
            ("cps", o.cps.to_string()),
            ("concurrency", o.concurrency.to_string()),
            ("duration", humantime::format_duration(o.duration).to_string()),
            ("ring", humantime::format_duration(o.ring).to_string()),
            ("hold", humantime::format_duration(o.hold).to_string()),
            ("utterances", o.utterances.join(" | ")),
            ("caller_voice", format!("{:?}", o.caller_voice).to_lowercase()),
            ("barge_in_after", o.barge_in_after.map_or("-".into(), |d| humantime::format_duration(d).to_string())),
        ]);
        let summary = summarise(o.mode, &calls, &timeline);
        Report { mode: o.mode, started_unix, duration_ms, agent, options, summary, calls, timeline }
    }

    /// The turn latencies with the time they were measured and the calls
    /// up then.
    fn turn_samples(&self) -> Vec<(f64, f64)> {
        self.calls
            .iter()
            .filter_map(|c| c.heard.as_ref())
            .flat_map(|h| h.turns.iter().filter_map(|t| t.latency_ms.map(|l| (t.at_ms, l))))
            .collect()
    }

    /// Writes report.json, summary.md and the plots into `dir`.
    pub fn write(&self, dir: &Path) -> anyhow::Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        std::fs::write(dir.join("report.json"), serde_json::to_vec_pretty(self)?)?;
        std::fs::write(dir.join("summary.md"), self.markdown())?;
        let samples = self.turn_samples();
        let latencies: Vec<f64> = samples.iter().map(|s| s.1).collect();
        let name = turn_metric(self.mode);
        plot_histogram(&dir.join("latency_histogram.svg"), &latencies, name).map_err(|e| anyhow::anyhow!("plot: {e}"))?;
        plot_cdf(&dir.join("latency_cdf.svg"), &latencies, name).map_err(|e| anyhow::anyhow!("plot: {e}"))?;
        plot_over_time(&dir.join("latency_over_time.svg"), &samples, &self.timeline, name).map_err(|e| anyhow::anyhow!("plot: {e}"))?;
        Ok(())
    }

    pub fn markdown(&self) -> String {
        let s = &self.summary;
        let mut md = String::new();
        let mode = match self.mode {
            Mode::Agent => "agent (full speech pipeline)",
            Mode::Media => "media (voxgate echoes; media engine alone)",
        };
        let _ = writeln!(md, "# voxgate load test: {mode}\n");
        let _ = writeln!(md, "Run of {:.1} s; options: {}\n", self.duration_ms / 1000.0, self.options.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(", "));
        let _ = writeln!(md, "| placed | answered | answer-seizure ratio | max concurrent | turns without reply |\n|---|---|---|---|---|");
        let _ = writeln!(md, "| {} | {} | {:.1} % | {} | {} |\n", s.placed, s.answered, s.answer_seizure_ratio, s.max_concurrent, s.turns_without_reply);
        if !s.failures.is_empty() {
            let _ = writeln!(md, "| failure | calls |\n|---|---|");
            for (why, n) in &s.failures {
                let _ = writeln!(md, "| {why} | {n} |");
            }
            md.push('\n');
        }
        let _ = writeln!(md, "| metric (ms) | n | p50 | p95 | p99 | max |\n|---|---|---|---|---|---|");
        for (name, st) in &s.metrics {
            let _ = writeln!(md, "| {name} | {} | {:.1} | {:.1} | {:.1} | {:.1} |", st.n, st.p50, st.p95, st.p99, st.max);
        }
        let r = &s.rtp;
        let _ = writeln!(
            md,
            "\nRTP received by the caller: {} packets, {} lost ({:.3} %), {} out of order, {} late, {} duplicates; {} calls with any loss.\n",
            r.packets_received, r.lost, r.loss_percent, r.out_of_order, r.late, r.duplicates, r.calls_with_loss
        );
        for (who, u) in [("voxgate server", &s.server), ("voxgate-loadtest", &s.loadtest)] {
            let Some(u) = u else { continue };
            let f = |v: Option<f64>, unit: &str| v.map_or("-".to_owned(), |v| format!("{v:.2}{unit}"));
            let _ = writeln!(
                md,
                "{who}: CPU at peak {} of one core ({} per call), RSS {:.0} MB at start, {:.0} MB peak ({} per call).\n",
                f(u.cpu_percent_at_peak, " %"),
                f(u.cpu_percent_per_call, " %"),
                u.rss_mb_start,
                u.rss_mb_peak,
                f(u.rss_mb_per_call, " MB")
            );
        }
        md.push_str("![latency histogram](latency_histogram.svg)\n![latency CDF](latency_cdf.svg)\n![latency and calls over time](latency_over_time.svg)\n");
        md
    }
}

fn summarise(mode: Mode, calls: &[CallRecord], timeline: &[Sample]) -> Summary {
    let placed = calls.len() as u32;
    let answered = calls.iter().filter(|c| matches!(c.outcome, Outcome::Answered)).count() as u32;
    let mut failures = BTreeMap::new();
    for why in calls.iter().filter_map(CallRecord::failure) {
        *failures.entry(why).or_insert(0) += 1;
    }
    let heard: Vec<&Heard> = calls.iter().filter_map(|c| c.heard.as_ref()).collect();
    let turns = || heard.iter().flat_map(|h| h.turns.iter());
    let mut metrics = BTreeMap::new();
    let mut add = |name: &str, values: Vec<f64>| {
        if let Some(st) = Stat::of(&values) {
            metrics.insert(name.to_owned(), st);
        }
    };
    add("post_dial_delay_ms", calls.iter().filter_map(|c| c.post_dial_delay_ms).collect());
    add("greeting_ms", heard.iter().filter_map(|h| h.greeting_ms).collect());
    add(turn_metric(mode), turns().filter_map(|t| t.latency_ms).collect());
    add("barge_in_stop_ms", turns().filter_map(|t| t.barge_in_stop_ms).collect());
    add("reply_longest_gap_ms", turns().filter_map(|t| t.longest_gap_ms).collect());
    add("call_jitter_ms", heard.iter().map(|h| h.rtp.jitter_ms).collect());
    let mut rtp = RtpTotals::default();
    for h in &heard {
        rtp.packets_sent += h.rtp.packets_sent;
        rtp.packets_received += h.rtp.packets_received;
        rtp.lost += h.rtp.lost;
        rtp.out_of_order += h.rtp.out_of_order;
        rtp.late += h.rtp.late;
        rtp.duplicates += h.rtp.duplicates;
        rtp.calls_with_loss += u32::from(h.rtp.lost > 0);
    }
    let expected = rtp.packets_received + rtp.lost;
    rtp.loss_percent = if expected == 0 { 0.0 } else { rtp.lost as f64 * 100.0 / expected as f64 };
    let max_concurrent = timeline.iter().map(|s| s.active).max().unwrap_or(0);
    Summary {
        placed,
        answered,
        answer_seizure_ratio: if placed == 0 { 0.0 } else { f64::from(answered) * 100.0 / f64::from(placed) },
        failures,
        max_concurrent,
        metrics,
        turns_without_reply: turns().filter(|t| t.latency_ms.is_none()).count() as u32,
        rtp,
        server: resource_use(timeline, |s| (s.server_cpu_percent, s.server_rss_mb)),
        loadtest: resource_use(timeline, |s| (s.loadtest_cpu_percent, s.loadtest_rss_mb)),
    }
}

fn resource_use(timeline: &[Sample], of: impl Fn(&Sample) -> (Option<f64>, Option<f64>)) -> Option<ResourceUse> {
    let rss: Vec<f64> = timeline.iter().filter_map(|s| of(s).1).collect();
    let (start, peak) = (*rss.first()?, rss.iter().copied().fold(f64::MIN, f64::max));
    let max_active = timeline.iter().map(|s| s.active).max().unwrap_or(0);
    let plateau: Vec<(f64, u32)> = timeline
        .iter()
        .filter(|s| max_active > 0 && f64::from(s.active) >= 0.9 * f64::from(max_active))
        .filter_map(|s| of(s).0.map(|cpu| (cpu, s.active)))
        .collect();
    let cpu = (!plateau.is_empty()).then(|| plateau.iter().map(|p| p.0).sum::<f64>() / plateau.len() as f64);
    let calls = (!plateau.is_empty()).then(|| plateau.iter().map(|p| f64::from(p.1)).sum::<f64>() / plateau.len() as f64);
    Some(ResourceUse {
        rss_mb_start: start,
        rss_mb_peak: peak,
        cpu_percent_at_peak: cpu,
        cpu_percent_per_call: cpu.zip(calls).map(|(c, n)| c / n),
        rss_mb_per_call: (max_active > 0).then(|| (peak - start) / f64::from(max_active)),
    })
}

type PlotResult = Result<(), Box<dyn std::error::Error>>;

const SIZE: (u32, u32) = (800, 480);

fn plot_histogram(path: &Path, values: &[f64], name: &str) -> PlotResult {
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let max = values.iter().copied().fold(0.0, f64::max).max(1.0);
    let bins = 40usize;
    let width = max / bins as f64;
    let mut counts = vec![0u32; bins];
    for v in values {
        counts[((v / width) as usize).min(bins - 1)] += 1;
    }
    let top = counts.iter().copied().max().unwrap_or(0).max(1);
    let mut chart = ChartBuilder::on(&root)
        .caption(format!("{name}: histogram ({} samples)", values.len()), ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(0.0..max * 1.02, 0u32..top + 1)?;
    chart.configure_mesh().x_desc(name).y_desc("samples").draw()?;
    chart.draw_series(counts.iter().enumerate().map(|(i, &c)| {
        let x0 = i as f64 * width;
        Rectangle::new([(x0, 0), (x0 + width * 0.9, c)], BLUE.filled())
    }))?;
    root.present()?;
    Ok(())
}

fn plot_cdf(path: &Path, values: &[f64], name: &str) -> PlotResult {
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let max = sorted.last().copied().unwrap_or(1.0).max(1.0);
    let mut chart = ChartBuilder::on(&root)
        .caption(format!("{name}: cumulative distribution"), ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(0.0..max * 1.02, 0.0..100.0)?;
    chart.configure_mesh().x_desc(name).y_desc("% of samples at or below").draw()?;
    let n = sorted.len() as f64;
    chart.draw_series(LineSeries::new(sorted.iter().enumerate().map(|(i, &v)| (v, (i + 1) as f64 * 100.0 / n)), &BLUE))?;
    root.present()?;
    Ok(())
}

/// Turn latencies (points, left axis) and calls up (line, right axis) against time.
fn plot_over_time(path: &Path, samples: &[(f64, f64)], timeline: &[Sample], name: &str) -> PlotResult {
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let end = timeline.last().map_or(1.0, |s| s.at_ms).max(samples.iter().map(|s| s.0).fold(1.0, f64::max)) / 1000.0;
    let top = samples.iter().map(|s| s.1).fold(1.0, f64::max) * 1.05;
    let calls = timeline.iter().map(|s| s.active).max().unwrap_or(1).max(1);
    let mut chart = ChartBuilder::on(&root)
        .caption(format!("{name} and concurrent calls over time"), ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .right_y_label_area_size(50)
        .build_cartesian_2d(0.0..end, 0.0..top)?
        .set_secondary_coord(0.0..end, 0u32..calls + calls / 10 + 1);
    chart.configure_mesh().x_desc("seconds").y_desc(name).draw()?;
    chart.configure_secondary_axes().y_desc("calls up").draw()?;
    chart
        .draw_series(samples.iter().map(|&(at, l)| Circle::new((at / 1000.0, l), 2, BLUE.filled())))?
        .label(name)
        .legend(|(x, y)| Circle::new((x, y), 3, BLUE.filled()));
    chart
        .draw_secondary_series(LineSeries::new(timeline.iter().map(|s| (s.at_ms / 1000.0, s.active)), &RED))?
        .label("calls up")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], RED));
    chart.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).draw()?;
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::script::{RtpQuality, Turn};

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), Some(50.0));
        assert_eq!(percentile(&v, 95.0), Some(95.0));
        assert_eq!(percentile(&v, 100.0), Some(100.0));
        assert_eq!(percentile(&[7.0], 99.0), Some(7.0));
        assert_eq!(percentile(&[], 50.0), None);
        assert_eq!(percentile(&[3.0, 1.0, 2.0], 0.0), Some(1.0));
    }

    fn answered(index: u32, latencies: &[f64], lost: u64) -> CallRecord {
        let mut c = CallRecord::new(index, format!("+14155550{index:03}"), 0.0);
        c.outcome = Outcome::Answered;
        c.post_dial_delay_ms = Some(30.0);
        c.heard = Some(Heard {
            greeting_ms: Some(50.0),
            turns: latencies
                .iter()
                .enumerate()
                .map(|(i, &l)| Turn { turn: i as u32 + 1, latency_ms: (l > 0.0).then_some(l), barge_in_stop_ms: None, longest_gap_ms: None, at_ms: 1000.0 * i as f64 })
                .collect(),
            rtp: RtpQuality { packets_received: 1000 - lost, lost, ..RtpQuality::default() },
            ended_by: "caller".into(),
        });
        c
    }

    fn sample(at_ms: f64, active: u32, cpu: f64, rss: f64) -> Sample {
        Sample {
            at_ms,
            active,
            answered: 0,
            failed: 0,
            server_cpu_percent: Some(cpu),
            server_rss_mb: Some(rss),
            loadtest_cpu_percent: None,
            loadtest_rss_mb: None,
        }
    }

    #[test]
    fn the_summary_counts_outcomes_latencies_loss_and_cost_per_call() {
        let mut refused = CallRecord::new(3, "+14155550003".into(), 0.0);
        refused.outcome = Outcome::Refused(Refusal { status: 429, code: "rate_limited".into(), message: String::new() });
        let calls = vec![answered(0, &[400.0, 600.0], 0), answered(1, &[500.0, 0.0], 10), refused, CallRecord::new(4, "x".into(), 0.0)];
        let timeline = vec![sample(0.0, 0, 5.0, 100.0), sample(1000.0, 2, 40.0, 120.0), sample(2000.0, 2, 60.0, 130.0), sample(3000.0, 1, 20.0, 110.0)];
        let s = summarise(Mode::Agent, &calls, &timeline);
        assert_eq!((s.placed, s.answered, s.answer_seizure_ratio), (4, 2, 50.0));
        assert_eq!(s.failures.get("api 429 rate_limited"), Some(&1));
        assert_eq!(s.failures.get("no INVITE"), Some(&1));
        let v2v = &s.metrics["voice_to_voice_ms"];
        assert_eq!((v2v.n, v2v.p50, v2v.max), (3, 500.0, 600.0));
        assert_eq!(s.turns_without_reply, 1);
        assert_eq!((s.rtp.lost, s.rtp.calls_with_loss), (10, 1));
        assert!((s.rtp.loss_percent - 0.5).abs() < 1e-9);
        let server = s.server.expect("server sampled");
        assert_eq!(server.cpu_percent_at_peak, Some(50.0));
        assert_eq!(server.cpu_percent_per_call, Some(25.0));
        assert_eq!(server.rss_mb_per_call, Some(15.0));
        assert!(s.loadtest.is_none());
    }

    #[test]
    fn the_report_is_written_with_its_plots() {
        let dir = std::env::temp_dir().join(format!("voxgate-loadtest-report-{}", std::process::id()));
        let o = <Options as clap::Parser>::try_parse_from(["x", "--api-key", "k"]).expect("options");
        let calls = vec![answered(0, &[400.0, 600.0], 0), answered(1, &[450.0], 0)];
        let report = Report::new(&o, "agent".into(), 0, 3000.0, calls, vec![sample(0.0, 2, 10.0, 100.0)]);
        report.write(&dir).expect("written");
        let json: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("report.json")).expect("json")).expect("parses");
        assert_eq!(json["summary"]["answered"], 2);
        assert_eq!(json["calls"][0]["result"], "answered");
        assert_eq!(json["calls"][0]["heard"]["turns"][1]["latency_ms"], 600.0);
        let md = std::fs::read_to_string(dir.join("summary.md")).expect("md");
        assert!(md.contains("| voice_to_voice_ms | 3 | 450.0 | 600.0 | 600.0 | 600.0 |"), "{md}");
        for plot in ["latency_histogram.svg", "latency_cdf.svg", "latency_over_time.svg"] {
            let svg = std::fs::read_to_string(dir.join(plot)).expect(plot);
            assert!(svg.starts_with("<svg") && svg.contains("voice_to_voice_ms"), "{plot}");
        }
        let _ = std::fs::remove_dir_all(dir);
    }
}

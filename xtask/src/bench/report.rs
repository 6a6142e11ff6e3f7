//! The bench's outputs: the table, the ratio chart (SVG), the targets and
//! docs/BENCHMARKS.md, from a run's JSON.

use std::fmt::Write as _;

use serde_json::Value;

use super::{
    DIAGNOSTICS, EXTRA_MODES, FIGURES, MODES, PROFILE_TARGETS, RATIO_TARGETS, WIRE_TARGETS,
    cni::{CNI_FIGURES, CNI_TARGETS, PLUGINS},
    measure::PROFILED,
};

/// How the bench measures, as docs/BENCHMARKS.md says it (kept in
/// docs/bench-method.md, where it is read and edited as prose).
const METHOD: &str = include_str!("../../../docs/bench-method.md");

/// One line per profiled load: weft's programs' share of all CPU time and
/// each program's time per run.
pub fn profile_lines(r: &Value) -> String {
    let mut s = String::new();
    let Some(modes) = r["bpf_profile"].as_object() else {
        return s;
    };
    for (mode, loads) in modes {
        for (load, _) in PROFILED {
            let p = &loads[*load];
            let per: Vec<String> = p["programs"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|row| {
                    Some(format!(
                        "{} {:.0} ns × {:.0}/s",
                        row["name"].as_str()?,
                        row["ns_per_run"].as_f64()?,
                        row["runs_per_s"].as_f64()?
                    ))
                })
                .collect();
            let _ = writeln!(
                s,
                "- `{mode}`, {load}: weft's BPF programs took {:.2} % of all CPU time ({})",
                p["total_cpu_pct"].as_f64().unwrap_or(f64::NAN),
                per.join("; ")
            );
        }
    }
    s
}

fn fmt(v: &Value) -> String {
    match v.as_f64() {
        Some(x) if x >= 100.0 => format!("{x:.0}"),
        Some(x) if x >= 10.0 => format!("{x:.1}"),
        Some(x) => format!("{x:.2}"),
        None => "—".into(),
    }
}

/// One table cell: median (min–max).
fn cell(c: &Value) -> String {
    format!(
        "{} ({}–{})",
        fmt(&c["median"]),
        fmt(&c["min"]),
        fmt(&c["max"])
    )
}

/// The results table (Markdown, also readable on a terminal).
pub fn table(r: &Value) -> String {
    let modes: Vec<&String> = r["modes"]
        .as_object()
        .map(|m| m.keys().collect())
        .unwrap_or_default();
    let order: Vec<&String> = MODES
        .iter()
        .chain(EXTRA_MODES)
        .filter_map(|m| modes.iter().find(|x| x.as_str() == *m).copied())
        .collect();
    let mut s = String::new();
    let _ = write!(s, "| figure |");
    for m in &order {
        let _ = write!(s, " {m} |");
    }
    let ratio_keys: Vec<String> = r["ratios"]
        .as_object()
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default();
    for k in &ratio_keys {
        let _ = write!(s, " {k} |");
    }
    let _ = write!(s, "\n|---|");
    for _ in 0..order.len() + ratio_keys.len() {
        let _ = write!(s, "---:|");
    }
    s.push('\n');
    for (f, desc, _) in FIGURES {
        let _ = write!(s, "| {desc} |");
        for m in &order {
            let _ = write!(s, " {} |", cell(&r["modes"][m.as_str()][*f]));
        }
        for k in &ratio_keys {
            let _ = write!(s, " {}× |", fmt(&r["ratios"][k][*f]));
        }
        s.push('\n');
    }
    for (f, desc) in DIAGNOSTICS {
        let _ = write!(s, "| {desc} |");
        for m in &order {
            let _ = write!(s, " {} |", cell(&r["modes"][m.as_str()][*f]));
        }
        s.push_str(&" |".repeat(ratio_keys.len()));
        s.push('\n');
    }
    if order.is_empty() {
        s.clear();
    }
    s + &cni_table(r)
}

/// The CNI figures' table, when the run measured them.
fn cni_table(r: &Value) -> String {
    let c = &r["cni"];
    if !c.is_object() {
        return String::new();
    }
    let mut s = format!(
        "\nPod set-up by the CNI plugin, on one node ({} pods one at a time, {} ADDs at once):\n\n| figure |",
        c["sequential_pods"], c["concurrent_adds"]
    );
    for p in PLUGINS {
        let _ = write!(s, " {p} |");
    }
    s.push_str(" weft/bridge+host-local |\n|---|");
    s.push_str(&"---:|".repeat(PLUGINS.len() + 1));
    s.push('\n');
    for (f, desc, _) in CNI_FIGURES {
        let _ = write!(s, "| {desc} |");
        for p in PLUGINS {
            let _ = write!(s, " {} |", cell(&c["plugins"][p][*f]));
        }
        let _ = writeln!(s, " {}× |", fmt(&c["ratios"]["weft/bridge+host-local"][*f]));
    }
    s
}

/// A bar chart of the ratios (SVG): one group of bars per figure, one bar
/// per baseline, each drawn from 1 × on a log scale (so 0.5 × and 2 × are
/// as long), with the side where weft is better shaded.
pub fn svg(r: &Value) -> String {
    let keys: Vec<String> = r["ratios"]
        .as_object()
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default();
    let colors = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b"];
    // log2 of the ratio, clamped to the axis: 1/16 × to 32 ×.
    let (lo, hi) = (-4.0f64, 5.0f64);
    let (w, label_w, right, top, bar_h, gap) = (900.0, 290.0, 20.0, 56.0, 14.0, 4.0);
    let plot_w = w - label_w - right;
    let x = |log: f64| label_w + plot_w * (log.clamp(lo, hi) - lo) / (hi - lo);
    let group_h = 20.0 + keys.len() as f64 * (bar_h + gap) + 12.0;
    let plot_bottom = top + FIGURES.len() as f64 * group_h;
    let h = plot_bottom + 84.0;
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"11\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"10\" y=\"20\" font-size=\"14\">weft / each baseline, median of runs (log scale; shaded: the side where weft is better)</text>\n"
    );
    // Axis: a grid line and a label per power of two; 1 × drawn solid.
    let mut log = lo;
    while log <= hi {
        let gx = x(log);
        let v = 2f64.powf(log);
        let text = if v < 1.0 {
            format!("1/{}×", 1.0 / v)
        } else {
            format!("{v}×")
        };
        let style = if log == 0.0 {
            "stroke=\"black\""
        } else {
            "stroke=\"#ccc\" stroke-dasharray=\"3\""
        };
        let _ = writeln!(
            s,
            "<line x1=\"{gx:.1}\" y1=\"{:.1}\" x2=\"{gx:.1}\" y2=\"{plot_bottom:.1}\" {style}/>\
             <text x=\"{gx:.1}\" y=\"{:.1}\" font-size=\"9\" text-anchor=\"middle\">{text}</text>",
            top - 12.0,
            top - 16.0
        );
        log += 1.0;
    }
    for (gi, (f, desc, higher_better)) in FIGURES.iter().enumerate() {
        let gy = top + gi as f64 * group_h;
        let (bx0, bx1) = if *higher_better {
            (x(0.0), x(hi))
        } else {
            (x(lo), x(0.0))
        };
        let _ = writeln!(
            s,
            "<rect x=\"{bx0:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"#e6f4e6\"/>\
             <text x=\"10\" y=\"{:.1}\" font-weight=\"bold\">{desc}</text>\
             <text x=\"10\" y=\"{:.1}\" font-size=\"9\" fill=\"#555\">{} is better</text>",
            gy + 4.0,
            bx1 - bx0,
            group_h - 8.0,
            gy + 18.0,
            gy + 30.0,
            if *higher_better { "higher" } else { "lower" }
        );
        for (ki, k) in keys.iter().enumerate() {
            let Some(v) = r["ratios"][k][*f]
                .as_f64()
                .filter(|v| *v >= 0.0 && v.is_finite())
            else {
                continue;
            };
            let by = gy + 20.0 + ki as f64 * (bar_h + gap);
            let (x0, x1) = (x(0.0), x(v.log2()));
            let (bx, bw) = (x0.min(x1), (x1 - x0).abs().max(1.0));
            // The issue's target for this ratio, if it has one.
            let target = RATIO_TARGETS
                .iter()
                .find(|(base, fig, _, _)| fig == f && *k == format!("weft/{base}"))
                .map(|(_, _, at_least, _)| x(at_least.log2()));
            // The value beyond the bar's end (and its target mark); inside
            // the bar, in white, where it reaches an edge of the chart.
            let (tx, anchor, fill) = if x1 >= x(hi) - 40.0 {
                (x1 - 4.0, "end", "white")
            } else if x1 >= x0 {
                (x1.max(target.unwrap_or(x1)) + 4.0, "start", "black")
            } else if x1 <= x(lo) + 40.0 {
                (x1 + 4.0, "start", "white")
            } else {
                (x1.min(target.unwrap_or(x1)) - 4.0, "end", "black")
            };
            let _ = writeln!(
                s,
                "<rect x=\"{bx:.1}\" y=\"{by:.1}\" width=\"{bw:.1}\" height=\"{bar_h}\" fill=\"{}\"/>\
                 <text x=\"{tx:.1}\" y=\"{:.1}\" font-size=\"10\" text-anchor=\"{anchor}\" fill=\"{fill}\">{v:.2}×</text>",
                colors[ki % colors.len()],
                by + bar_h - 3.0
            );
            if let Some(t) = target {
                let _ = writeln!(
                    s,
                    "<line x1=\"{t:.1}\" y1=\"{:.1}\" x2=\"{t:.1}\" y2=\"{:.1}\" stroke=\"#c00\" stroke-width=\"2\"/>",
                    by - 2.0,
                    by + bar_h + 2.0
                );
            }
        }
    }
    for (ki, k) in keys.iter().enumerate() {
        let lx = 10.0 + ki as f64 * 220.0;
        let _ = writeln!(
            s,
            "<rect x=\"{lx}\" y=\"{:.1}\" width=\"12\" height=\"12\" fill=\"{}\"/><text x=\"{}\" y=\"{:.1}\">{k}</text>",
            h - 40.0,
            colors[ki % colors.len()],
            lx + 16.0,
            h - 30.0
        );
    }
    let _ = writeln!(
        s,
        "<line x1=\"16\" y1=\"{0:.1}\" x2=\"16\" y2=\"{1:.1}\" stroke=\"#c00\" stroke-width=\"2\"/><text x=\"26\" y=\"{1:.1}\">the issue's target for that ratio</text>",
        h - 24.0,
        h - 12.0
    );
    s.push_str("</svg>\n");
    s
}

/// docs/BENCHMARKS.md, generated from a run.
pub fn docs(r: &Value, runs: usize, secs: u32) -> String {
    let m = &r["machine"];
    let mut s = String::new();
    let _ = writeln!(
        s,
        "# Benchmarks\n\n<!-- Generated by `cargo xtask bench --docs` from a real run; do not edit by hand. -->\n"
    );
    let _ = writeln!(
        s,
        "## How to run\n\n```sh\ncargo xtask bench                 # all modes, 3 runs × 5 s per figure\ncargo xtask bench --quick         # about a minute: 1 run × 2 s\ncargo xtask bench --modes weft,kernel-vxlan --json out.json\ncargo xtask bench --cc cubic       # TCP with cubic instead of the machine's default congestion control\ncargo xtask bench --docs          # regenerate this page, docs/bench-ratios.svg and docs/bench-results.json\n```\n"
    );
    let _ = writeln!(
        s,
        "## This run\n\n{}, {} runs × {} s per figure, `{}` underlay, {}, TCP congestion control {}, on {} ({} cores, kernel {}).\n",
        r["date"].as_str().unwrap_or(""),
        runs,
        secs,
        r["underlay"].as_str().unwrap_or("nic-like"),
        if r["pinned"].as_bool() == Some(true) {
            "client on CPU 0 and server on CPU 1"
        } else {
            "client and server placed by the scheduler (`--no-pin`)"
        },
        match (
            r["tcp_congestion_control"].as_str(),
            r["tcp_congestion_control_chosen"].as_bool()
        ) {
            (Some(cc), Some(true)) if !cc.is_empty() => format!("`{cc}` (`--cc`)"),
            (Some(cc), _) if !cc.is_empty() => format!("`{cc}` (the machine's default)"),
            _ => "not recorded".to_string(),
        },
        m["cpu"].as_str().unwrap_or("?"),
        m["cores"],
        m["kernel"].as_str().unwrap_or("?")
    );
    let _ = writeln!(
        s,
        "Each cell: median (min–max). Ratios are weft's median over the baseline's (`weft-scale/weft`: the scale mode's over weft's).\n\n{}",
        table(r)
    );
    let _ = writeln!(s, "![ratios](bench-ratios.svg)\n");
    let _ = writeln!(s, "{}", targets(r));
    let prof = profile_lines(r);
    if !prof.is_empty() {
        let _ = writeln!(
            s,
            "## weft's BPF programs in this run\n\nMeasured by `weft profile` (the kernel's run count and run time per program, BPF_ENABLE_STATS) during an extra iperf3 pass per load, after the figures above; both nodes' copies summed; time per run × runs per second:\n\n{prof}"
        );
    }
    let _ = writeln!(s, "{}", METHOD);
    s
}

/// The project's targets (issue #6) against this run's medians.
pub fn targets(r: &Value) -> String {
    let med = |mode: &str, fig: &str| r["modes"][mode][fig]["median"].as_f64();
    let mut s = String::from(
        "## Targets against this run\n\nComputed from the medians above; why and where the time goes: docs/PERFORMANCE.md.\n\n| target | measured | met |\n|---|---|---|\n",
    );
    let rr_row = || match med("weft", "rr_p50_us").zip(med("kernel-vxlan", "rr_p50_us")) {
        Some((w, k)) => format!(
            "| weft TCP_RR p50 below kernel-vxlan's | {w:.1} vs {k:.1} µs | {} |\n",
            if w < k { "yes" } else { "no" }
        ),
        None => "| weft TCP_RR p50 below kernel-vxlan's | not measured in this run | — |\n".into(),
    };
    for (fig, bound, ceiling, name) in CNI_TARGETS {
        s += &match r["cni"]["ratios"]["weft/bridge+host-local"][fig].as_f64() {
            Some(ratio) => format!(
                "| {name} | {ratio:.2} × | {} |\n",
                if (*ceiling && ratio <= *bound) || (!*ceiling && ratio >= *bound) {
                    "yes"
                } else {
                    "no"
                }
            ),
            None => format!("| {name} | not measured in this run | — |\n"),
        };
    }
    for (i, (base, fig, at_least, name)) in RATIO_TARGETS.iter().enumerate() {
        // (The latency target, not a ratio, stands third as in the issue.)
        if i == 2 {
            s += &rr_row();
        }
        s += &match med("weft", fig).zip(med(base, fig)) {
            Some((w, b)) => format!(
                "| {name} | {:.2} × | {} |\n",
                w / b,
                if w / b >= *at_least { "yes" } else { "no" }
            ),
            None => format!("| {name} | not measured in this run | — |\n"),
        };
    }
    let met = |yes: bool| if yes { "yes" } else { "no" };
    for (mode, base, fig, bound, ceiling, name) in WIRE_TARGETS {
        s += &match med(mode, fig).zip(med(base, fig)) {
            Some((m, b)) => {
                let ratio = m / b;
                format!(
                    "| {name} | {ratio:.2} × | {} |\n",
                    met(if *ceiling {
                        ratio <= *bound
                    } else {
                        ratio >= *bound
                    })
                )
            }
            None => format!("| {name} | not measured in this run | — |\n"),
        };
    }
    for (program, budget) in PROFILE_TARGETS {
        let ns = r["bpf_profile"]["weft"]["udp64"]["programs"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|row| row["name"] == *program)
            .and_then(|row| row["ns_per_run"].as_f64());
        let name = format!("`{program}` ≤ {budget:.0} ns per 64-byte packet (weft profile)");
        s += &match ns {
            Some(ns) => format!("| {name} | {ns:.0} ns | {} |\n", met(ns <= *budget)),
            None => format!("| {name} | not measured in this run | — |\n"),
        };
    }
    s
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    /// (x, width) of every bar in a chart: the rects `height="14"`.
    fn bars(svg: &str) -> Vec<(f64, f64)> {
        let attr = |line: &str, name: &str| -> f64 {
            let rest = &line[line.find(&format!(" {name}=\"")).unwrap() + name.len() + 3..];
            rest[..rest.find('"').unwrap()].parse().unwrap()
        };
        svg.lines()
            .filter(|l| l.starts_with("<rect") && l.contains("height=\"14\""))
            .map(|l| (attr(l, "x"), attr(l, "width")))
            .collect()
    }

    #[test]
    fn chart_draws_ratios_from_one_on_a_log_scale_and_marks_the_targets() {
        let r = json!({"ratios": {"weft/a": {
            "tcp1_gbps": 2.0, "rr_p50_us": 0.5, "tcp4_gbps": null, "udp64_loss_pct": 0.0
        }}});
        let svg = svg(&r);
        let b = bars(&svg);
        assert_eq!(b.len(), 3, "one bar per ratio present, 0 too: {svg}");
        assert!(svg.contains("0.00×"), "0 labelled");
        let (up, down) = (b[0], b[2]);
        assert!((up.1 - down.1).abs() < 0.2, "2 × and 0.5 × as long: {b:?}");
        assert!(
            (up.0 - (down.0 + down.1)).abs() < 0.2,
            "2 × starts at 1 ×, where 0.5 × ends: {b:?}"
        );
        for label in [
            "2.00×",
            "0.50×",
            "higher is better",
            "lower is better",
            "weft/a",
        ] {
            assert!(svg.contains(label), "{label} in the chart");
        }
        let marks = |svg: &str| svg.matches("stroke=\"#c00\"").count() - 1; // less the legend's
        assert_eq!(marks(&svg), 0, "no target for weft/a");
        let r = json!({"ratios": {"weft/kernel-vxlan": {"tcp1_gbps": 1.2, "tcp4_gbps": 1.2}}});
        assert_eq!(marks(&super::svg(&r)), 1, "the 1-stream target alone");
    }
}

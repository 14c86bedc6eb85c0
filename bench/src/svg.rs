//! Plain SVG line charts (hand-written: two chart shapes do not justify a
//! plotting crate and its dependency tree).

use std::fmt::Write as _;

/// Axis scale.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scale {
    /// Linear.
    Linear,
    /// Base-10 logarithmic (values ≤ 0 are clamped to the axis minimum).
    Log,
}

/// One chart.
#[derive(Debug, Clone)]
pub struct Chart {
    /// Title.
    pub title: String,
    /// X axis label.
    pub x_label: String,
    /// Y axis label.
    pub y_label: String,
    /// X scale.
    pub x_scale: Scale,
    /// Y scale.
    pub y_scale: Scale,
    /// Series: name and points.
    pub series: Vec<(String, Vec<(f64, f64)>)>,
    /// Optional fixed Y range.
    pub y_range: Option<(f64, f64)>,
    /// Horizontal reference lines: (y, label).
    pub h_lines: Vec<(f64, String)>,
}

const W: f64 = 860.0;
const H: f64 = 500.0;
const ML: f64 = 80.0;
const MR: f64 = 230.0;
const MT: f64 = 50.0;
const MB: f64 = 60.0;
const COLORS: [&str; 10] =
    ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#7f7f7f", "#bcbd22"];

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// Tick positions of an axis range.
pub fn ticks(lo: f64, hi: f64, scale: Scale) -> Vec<f64> {
    match scale {
        Scale::Log => {
            let (a, b) = (lo.log10().floor() as i32, hi.log10().ceil() as i32);
            let mut t = Vec::new();
            for e in a..=b {
                for m in [1.0, 2.0, 5.0] {
                    let v = m * 10f64.powi(e);
                    if v >= lo * 0.999 && v <= hi * 1.001 {
                        t.push(v);
                    }
                }
            }
            t
        }
        Scale::Linear => {
            let span = (hi - lo).max(1e-12);
            let raw = span / 6.0;
            let mag = 10f64.powf(raw.log10().floor());
            let step =
                [1.0, 2.0, 2.5, 5.0, 10.0].iter().map(|m| m * mag).find(|s| span / s <= 8.0).unwrap_or(10.0 * mag);
            let mut t = Vec::new();
            let mut v = (lo / step).ceil() * step;
            while v <= hi + step * 1e-9 && t.len() < 20 {
                t.push(v);
                v += step;
            }
            t
        }
    }
}

fn label(v: f64) -> String {
    if v == 0.0 {
        "0".into()
    } else if v.abs() >= 1e6 {
        format!("{:.0}M", v / 1e6)
    } else if v.abs() >= 1e4 {
        format!("{:.0}k", v / 1e3)
    } else if v.abs() >= 10.0 || (v - v.round()).abs() < 1e-9 {
        format!("{v:.0}")
    } else if v.abs() >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

impl Chart {
    fn bounds(&self) -> ((f64, f64), (f64, f64)) {
        let pts = self.series.iter().flat_map(|(_, p)| p.iter());
        let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
        for &(x, y) in pts {
            if self.x_scale == Scale::Log && x <= 0.0 || self.y_scale == Scale::Log && y <= 0.0 {
                continue;
            }
            x0 = x0.min(x);
            x1 = x1.max(x);
            y0 = y0.min(y);
            y1 = y1.max(y);
        }
        if x0 > x1 {
            (x0, x1) = (1.0, 10.0);
        }
        if y0 > y1 {
            (y0, y1) = (1.0, 10.0);
        }
        if let Some(r) = self.y_range {
            (y0, y1) = r;
        } else if self.y_scale == Scale::Linear {
            y0 = y0.min(0.0);
        }
        let fix = |lo: f64, hi: f64, s: Scale| match s {
            Scale::Log => {
                let lo = 10f64.powf(lo.log10().floor());
                let hi = 10f64.powf(hi.log10().ceil());
                (lo, if hi <= lo { lo * 10.0 } else { hi })
            }
            Scale::Linear => (lo, if hi <= lo { lo + 1.0 } else { hi }),
        };
        (fix(x0, x1, self.x_scale), fix(y0, y1, self.y_scale))
    }

    /// The SVG document.
    pub fn render(&self) -> String {
        let ((x0, x1), (y0, y1)) = self.bounds();
        let pw = W - ML - MR;
        let ph = H - MT - MB;
        let map = |v: f64, lo: f64, hi: f64, s: Scale| -> f64 {
            match s {
                Scale::Linear => (v - lo) / (hi - lo),
                Scale::Log => (v.max(lo).log10() - lo.log10()) / (hi.log10() - lo.log10()),
            }
        };
        let px = |x: f64| ML + pw * map(x, x0, x1, self.x_scale).clamp(0.0, 1.0);
        let py = |y: f64| MT + ph * (1.0 - map(y, y0, y1, self.y_scale).clamp(0.0, 1.0));
        let mut s = String::new();
        let _ = writeln!(
            s,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">"#
        );
        let _ = writeln!(s, r#"<rect width="{W}" height="{H}" fill="white"/>"#);
        let _ = writeln!(
            s,
            r#"<text x="{}" y="28" font-size="16" text-anchor="middle">{}</text>"#,
            ML + pw / 2.0,
            esc(&self.title)
        );
        for t in ticks(x0, x1, self.x_scale) {
            let x = px(t);
            let _ = writeln!(s, r##"<line x1="{x:.1}" y1="{MT}" x2="{x:.1}" y2="{:.1}" stroke="#e5e5e5"/>"##, MT + ph);
            let _ =
                writeln!(s, r#"<text x="{x:.1}" y="{:.1}" text-anchor="middle">{}</text>"#, MT + ph + 16.0, label(t));
        }
        for t in ticks(y0, y1, self.y_scale) {
            let y = py(t);
            let _ = writeln!(s, r##"<line x1="{ML}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#e5e5e5"/>"##, ML + pw);
            let _ =
                writeln!(s, r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#, ML - 6.0, y + 4.0, label(t));
        }
        let _ = writeln!(s, r#"<rect x="{ML}" y="{MT}" width="{pw}" height="{ph}" fill="none" stroke="black"/>"#);
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            ML + pw / 2.0,
            H - 15.0,
            esc(&self.x_label)
        );
        let _ = writeln!(
            s,
            r#"<text x="20" y="{:.1}" text-anchor="middle" transform="rotate(-90 20 {:.1})">{}</text>"#,
            MT + ph / 2.0,
            MT + ph / 2.0,
            esc(&self.y_label)
        );
        for (y, text) in &self.h_lines {
            let yy = py(*y);
            let _ = writeln!(
                s,
                r##"<line x1="{ML}" y1="{yy:.1}" x2="{:.1}" y2="{yy:.1}" stroke="#555" stroke-dasharray="6 4"/>"##,
                ML + pw
            );
            let _ = writeln!(s, r##"<text x="{:.1}" y="{:.1}" fill="#555">{}</text>"##, ML + 6.0, yy - 4.0, esc(text));
        }
        for (i, (name, pts)) in self.series.iter().enumerate() {
            let color = COLORS[i % COLORS.len()];
            let path: Vec<String> = pts
                .iter()
                .filter(|(x, y)| !(self.x_scale == Scale::Log && *x <= 0.0 || self.y_scale == Scale::Log && *y <= 0.0))
                .map(|&(x, y)| format!("{:.1},{:.1}", px(x), py(y)))
                .collect();
            if !path.is_empty() {
                let _ = writeln!(
                    s,
                    r#"<polyline fill="none" stroke="{color}" stroke-width="2" points="{}"/>"#,
                    path.join(" ")
                );
            }
            let ly = MT + 10.0 + 20.0 * i as f64;
            let lx = ML + pw + 15.0;
            let _ = writeln!(
                s,
                r#"<line x1="{lx}" y1="{ly}" x2="{}" y2="{ly}" stroke="{color}" stroke-width="3"/>"#,
                lx + 22.0
            );
            let _ = writeln!(s, r#"<text x="{}" y="{}">{}</text>"#, lx + 28.0, ly + 4.0, esc(name));
        }
        s.push_str("</svg>\n");
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_round() {
        assert_eq!(ticks(10.0, 1000.0, Scale::Log), vec![10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0]);
        let lin = ticks(0.0, 1.0, Scale::Linear);
        assert_eq!(lin.len(), 6);
        assert!((lin[1] - 0.2).abs() < 1e-9 && (lin[5] - 1.0).abs() < 1e-9);
        let chart = Chart {
            title: "a <b>".into(),
            x_label: "x".into(),
            y_label: "y".into(),
            x_scale: Scale::Log,
            y_scale: Scale::Linear,
            series: vec![("s".into(), vec![(10.0, 0.1), (100.0, 0.9), (0.0, 1.0)])],
            y_range: Some((0.0, 1.0)),
            h_lines: vec![(0.5, "p50".into())],
        };
        let svg = chart.render();
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>\n"));
        assert!(svg.contains("a &lt;b&gt;"));
        assert_eq!(svg.matches("<polyline").count(), 1);
    }
}

//! A strict parser of the Prometheus / OpenMetrics text exposition format,
//! for tests that scrape a daemon's `/metrics`: it fails on any line it does
//! not understand, on a sample of an undeclared family, on a counter sample
//! without `_total`, and on an OpenMetrics body without its final `# EOF`.

use std::collections::{BTreeMap, BTreeSet, HashMap};

/// One sample line.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Full sample name (`x_total`, `x_bucket`, ...).
    pub name: String,
    /// Labels, sorted by name.
    pub labels: BTreeMap<String, String>,
    /// Value.
    pub value: f64,
}

impl Sample {
    /// `name{k="v",...}`: identifies the series.
    pub fn series(&self) -> String {
        let labels: Vec<String> = self.labels.iter().map(|(k, v)| format!("{k}={v:?}")).collect();
        format!("{}{{{}}}", self.name, labels.join(","))
    }
}

/// A parsed scrape.
#[derive(Debug, Clone, Default)]
pub struct Exposition {
    /// Family name -> type (`counter`, `gauge`, `histogram`, `info`, ...).
    pub types: HashMap<String, String>,
    /// Family name -> help text.
    pub help: HashMap<String, String>,
    /// Samples in order.
    pub samples: Vec<Sample>,
}

/// Suffixes a sample of each type may add to its family name.
fn suffixes(kind: &str) -> &'static [&'static str] {
    match kind {
        "counter" => &["_total", "_created"],
        "histogram" => &["_bucket", "_sum", "_count", "_created"],
        "summary" => &["", "_sum", "_count", "_created"],
        "info" => &["_info"],
        _ => &[""],
    }
}

fn parse_labels(text: &str, line: &str) -> Result<BTreeMap<String, String>, String> {
    let mut labels = BTreeMap::new();
    let mut chars = text.chars().peekable();
    loop {
        while chars.peek() == Some(&',') || chars.peek() == Some(&' ') {
            chars.next();
        }
        if chars.peek().is_none() {
            return Ok(labels);
        }
        let mut key = String::new();
        for c in chars.by_ref() {
            if c == '=' {
                break;
            }
            key.push(c);
        }
        if key.is_empty() || !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(format!("bad label name {key:?} in {line:?}"));
        }
        if chars.next() != Some('"') {
            return Err(format!("label {key} without a quoted value in {line:?}"));
        }
        let mut value = String::new();
        let mut closed = false;
        while let Some(c) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some('n') => value.push('\n'),
                    Some('\\') => value.push('\\'),
                    Some('"') => value.push('"'),
                    other => return Err(format!("bad escape {other:?} in {line:?}")),
                },
                '"' => {
                    closed = true;
                    break;
                }
                c => value.push(c),
            }
        }
        if !closed {
            return Err(format!("unterminated label value in {line:?}"));
        }
        if labels.insert(key.clone(), value).is_some() {
            return Err(format!("label {key} twice in {line:?}"));
        }
    }
}

fn parse_value(v: &str, line: &str) -> Result<f64, String> {
    match v {
        "+Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        "NaN" => Ok(f64::NAN),
        v => v.parse().map_err(|e| format!("bad value {v:?} in {line:?}: {e}")),
    }
}

/// Parses a scrape body.
pub fn parse(body: &str) -> Result<Exposition, String> {
    let mut out = Exposition::default();
    let mut eof = false;
    for line in body.lines() {
        if eof {
            return Err(format!("text after # EOF: {line:?}"));
        }
        if line.is_empty() {
            continue;
        }
        if line == "# EOF" {
            eof = true;
            continue;
        }
        if let Some(rest) = line.strip_prefix("# ") {
            let mut parts = rest.splitn(3, ' ');
            let (what, name, text) = (parts.next(), parts.next(), parts.next().unwrap_or(""));
            let name = name.ok_or_else(|| format!("comment without a metric name: {line:?}"))?;
            match what {
                Some("TYPE") => {
                    if out.types.insert(name.to_string(), text.to_string()).is_some() {
                        return Err(format!("family {name} declared twice"));
                    }
                }
                Some("HELP") => {
                    out.help.insert(name.to_string(), text.to_string());
                }
                Some("UNIT") => {}
                _ => return Err(format!("unknown comment {line:?}")),
            }
            continue;
        }
        let (head, value) = match line.rfind('}') {
            Some(close) => (&line[..=close], line[close + 1..].trim()),
            None => line.split_once(' ').ok_or_else(|| format!("sample without a value: {line:?}"))?,
        };
        let value = value.split(' ').next().unwrap_or_default();
        let (name, labels) = match head.split_once('{') {
            Some((name, rest)) => {
                let inner = rest.strip_suffix('}').ok_or_else(|| format!("unclosed labels in {line:?}"))?;
                (name, parse_labels(inner, line)?)
            }
            None => (head, BTreeMap::new()),
        };
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':') {
            return Err(format!("bad metric name {name:?} in {line:?}"));
        }
        let declared = out
            .types
            .iter()
            .any(|(family, kind)| suffixes(kind).iter().any(|s| name.strip_suffix(s) == Some(family.as_str())));
        if !declared {
            return Err(format!("sample {name} has no # TYPE line for its family (or the wrong suffix): {line:?}"));
        }
        out.samples.push(Sample { name: name.to_string(), labels, value: parse_value(value, line)? });
    }
    if body.contains("# EOF") != eof {
        return Err("# EOF not on a line of its own".into());
    }
    Ok(out)
}

impl Exposition {
    /// Samples named `name` whose labels include every pair of `labels`.
    pub fn find<'a>(&'a self, name: &'a str, labels: &'a [(&str, &str)]) -> impl Iterator<Item = &'a Sample> + 'a {
        self.samples.iter().filter(move |s| {
            s.name == name && labels.iter().all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
    }

    /// The one sample named `name` with these labels; an error if there is
    /// none or more than one.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Result<f64, String> {
        let found: Vec<&Sample> = self.find(name, labels).collect();
        match found.as_slice() {
            [one] => Ok(one.value),
            [] => Err(format!("no sample {name} with {labels:?}")),
            many => Err(format!("{} samples {name} with {labels:?}", many.len())),
        }
    }

    /// Every series (name and labels) in the scrape.
    pub fn series(&self) -> BTreeSet<String> {
        self.samples.iter().map(Sample::series).collect()
    }

    /// Every sample name in the scrape.
    pub fn names(&self) -> BTreeSet<String> {
        self.samples.iter().map(|s| s.name.clone()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_openmetrics_and_rejects_what_it_does_not_know() {
        let body = "# HELP a_x things\n# TYPE a_x counter\na_x_total{g=\"q\\\"z\",k=\"v\"} 3\n\
                    # TYPE h histogram\nh_bucket{le=\"+Inf\"} 1\nh_sum 0.5\nh_count 1\n\
                    # TYPE b info\nb_info{version=\"1\"} 1\n# EOF\n";
        let e = parse(body).expect("valid");
        assert_eq!(e.value("a_x_total", &[("g", "q\"z")]), Ok(3.0));
        assert_eq!(e.value("h_bucket", &[("le", "+Inf")]), Ok(1.0));
        assert_eq!(e.types.get("b").map(String::as_str), Some("info"));
        assert!(parse("a 1\n").is_err(), "undeclared family");
        assert!(parse("# TYPE a counter\na 1\n").is_err(), "counter without _total");
        assert!(parse("# TYPE a gauge\na{x=1} 1\n").is_err(), "unquoted label");
        assert!(parse("# TYPE a gauge\na one\n").is_err(), "bad value");
        assert!(parse("# TYPE a gauge\n# EOF\na 1\n").is_err(), "after EOF");
    }
}

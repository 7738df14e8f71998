//! The benchmark's figures: percentiles over samples, one row per figure with its target and verdict,
//! printed as a table and written as JSON.

use std::time::Duration;

use serde_json::{Value, json};

/// Latency samples in milliseconds.
#[derive(Default, Clone)]
pub struct Samples(pub Vec<f64>);

impl Samples {
    pub fn push(&mut self, duration: Duration) {
        self.0.push(duration.as_secs_f64() * 1000.0);
    }

    /// Nearest-rank percentile; NaN without samples.
    pub fn percentile(&self, p: f64) -> f64 {
        if self.0.is_empty() {
            return f64::NAN;
        }
        let mut sorted = self.0.clone();
        sorted.sort_by(f64::total_cmp);
        let rank = ((p / 100.0) * sorted.len() as f64).ceil().max(1.0) as usize;
        sorted[rank.min(sorted.len()) - 1]
    }

    pub fn max(&self) -> f64 {
        self.0.iter().copied().fold(f64::NAN, f64::max)
    }

    pub fn summary(&self) -> String {
        format!(
            "p50 {:.1} · p95 {:.1} · p99 {:.1} · max {:.1} ms (n={})",
            self.percentile(50.0),
            self.percentile(95.0),
            self.percentile(99.0),
            self.max(),
            self.0.len()
        )
    }

    pub fn json(&self) -> Value {
        json!({
            "n": self.0.len(),
            "p50_ms": round(self.percentile(50.0)),
            "p95_ms": round(self.percentile(95.0)),
            "p99_ms": round(self.percentile(99.0)),
            "max_ms": round(self.max()),
        })
    }
}

pub struct Row {
    pub figure: String,
    pub measured: String,
    pub target: String,
    /// None: reported only.
    pub pass: Option<bool>,
    pub data: Value,
}

#[derive(Default)]
pub struct Report {
    pub rows: Vec<Row>,
    pub notes: Vec<String>,
}

impl Report {
    pub fn row(
        &mut self,
        figure: &str,
        measured: String,
        target: &str,
        pass: Option<bool>,
        data: Value,
    ) {
        println!("  · {figure}: {measured}");
        self.rows.push(Row {
            figure: figure.to_string(),
            measured,
            target: target.to_string(),
            pass,
            data,
        });
    }

    pub fn latency(&mut self, figure: &str, samples: &Samples, target: &str, limit: (f64, f64)) {
        let (percentile, bound_ms) = limit;
        let value = samples.percentile(percentile);
        // An infinite bound marks a figure that is only reported.
        let pass = bound_ms.is_finite().then_some(value <= bound_ms);
        self.row(figure, samples.summary(), target, pass, samples.json());
    }

    pub fn note(&mut self, note: String) {
        println!("  note: {note}");
        self.notes.push(note);
    }

    pub fn table(&self) -> String {
        let verdict = |pass: Option<bool>| match pass {
            Some(true) => "PASS",
            Some(false) => "MISS",
            None => "—",
        };
        let mut out = String::from("| figure | measured | target | |\n|---|---|---|---|\n");
        for row in &self.rows {
            out.push_str(&format!(
                "| {} | {} | {} | {} |\n",
                row.figure,
                row.measured,
                row.target,
                verdict(row.pass)
            ));
        }
        out
    }

    pub fn json(&self, context: Value) -> Value {
        let rows: Vec<Value> = self
            .rows
            .iter()
            .map(|r| {
                json!({
                    "figure": r.figure,
                    "measured": r.measured,
                    "target": r.target,
                    "pass": r.pass,
                    "data": r.data,
                })
            })
            .collect();
        json!({"context": context, "rows": rows, "notes": self.notes})
    }
}

pub fn round(value: f64) -> Value {
    if value.is_finite() {
        json!((value * 100.0).round() / 100.0)
    } else {
        Value::Null
    }
}

pub fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

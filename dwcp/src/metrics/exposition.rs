//! From the OpenMetrics text prometheus-client writes to the Prometheus text
//! format 0.0.4.
//!
//! Prometheus servers ask for OpenMetrics and get it as is; everything else
//! (promtool 2.42's `check metrics`, curl, older scrapers) gets format 0.0.4,
//! where a counter's HELP and TYPE name the sample (`foo_total`), there is no
//! `# UNIT` or `# EOF` line, and an `info` metric is a gauge `foo_info`.

/// The content type of [`to_prometheus_text`]'s output.
pub const TEXT_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";
/// The content type of the OpenMetrics exposition.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Converts an OpenMetrics exposition to the Prometheus text format 0.0.4.
pub fn to_prometheus_text(om: &str) -> String {
    // Families whose metadata names change: counter `foo` → `foo_total`,
    // info `foo` → `foo_info`.
    let mut renamed: Vec<(String, String, &'static str)> = Vec::new();
    for line in om.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut it = rest.splitn(2, ' ');
            let (name, ty) = (it.next().unwrap_or(""), it.next().unwrap_or(""));
            match ty {
                "counter" if !name.ends_with("_total") => {
                    renamed.push((name.to_string(), format!("{name}_total"), "counter"))
                }
                "info" => renamed.push((name.to_string(), format!("{name}_info"), "gauge")),
                _ => {}
            }
        }
    }
    let meta_name = |name: &str| {
        renamed
            .iter()
            .find(|(n, _, _)| n == name)
            .map(|(_, new, ty)| (new.clone(), *ty))
    };
    let mut out = String::with_capacity(om.len());
    for line in om.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
            let name = meta_name(name).map(|(n, _)| n).unwrap_or(name.to_string());
            out.push_str(&format!("# HELP {name} {help}\n"));
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, ty) = rest.split_once(' ').unwrap_or((rest, "untyped"));
            match meta_name(name) {
                Some((n, t)) => out.push_str(&format!("# TYPE {n} {t}\n")),
                None => {
                    let ty = if ty == "unknown" { "untyped" } else { ty };
                    out.push_str(&format!("# TYPE {name} {ty}\n"))
                }
            }
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// Whether a request's Accept header asks for OpenMetrics.
pub fn wants_openmetrics(accept: Option<&str>) -> bool {
    accept.is_some_and(|a| a.contains("application/openmetrics-text"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_named_by_their_sample_and_eof_goes() {
        let om = "# HELP a_bytes Bytes.\n# TYPE a_bytes counter\na_bytes_total{d=\"x\"} 3\n\
                  # HELP g A gauge.\n# TYPE g gauge\ng 1\n# HELP i Info.\n# TYPE i info\ni_info{v=\"1\"} 1\n# EOF\n";
        let t = to_prometheus_text(om);
        assert_eq!(
            t,
            "# HELP a_bytes_total Bytes.\n# TYPE a_bytes_total counter\na_bytes_total{d=\"x\"} 3\n\
             # HELP g A gauge.\n# TYPE g gauge\ng 1\n# HELP i_info Info.\n# TYPE i_info gauge\ni_info{v=\"1\"} 1\n"
        );
    }

    #[test]
    fn accept_header() {
        assert!(wants_openmetrics(Some(
            "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
        )));
        assert!(!wants_openmetrics(Some("*/*")));
        assert!(!wants_openmetrics(None));
    }
}

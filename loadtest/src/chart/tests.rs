use super::*;
use crate::metrics::tests::sample_records;

/// Checks that every tag is closed in order and the document is one `<svg>` element.
fn assert_well_formed(svg: &str) {
    assert!(svg.starts_with("<svg "), "{}", &svg[..svg.len().min(80)]);
    let mut open: Vec<&str> = Vec::new();
    let mut rest = svg;
    let mut roots = 0;
    while let Some(start) = rest.find('<') {
        let end = rest[start..]
            .find('>')
            .map(|e| start + e)
            .expect("every tag is closed by >");
        let tag = &rest[start + 1..end];
        if let Some(closing) = tag.strip_prefix('/') {
            assert_eq!(open.pop(), Some(closing.trim()), "mismatched </{closing}>");
        } else {
            if open.is_empty() {
                roots += 1;
            }
            let tag_name = tag.split_whitespace().next().unwrap_or_default().trim_end_matches('/');
            if !tag.ends_with('/') {
                open.push(tag_name);
            }
        }
        assert!(!rest[start + 1..end].contains('<'), "a < inside a tag");
        rest = &rest[end + 1..];
    }
    assert!(open.is_empty(), "unclosed: {open:?}");
    assert_eq!(roots, 1);
}

fn fault(kind: FaultKind, at_ms: f64, until_ms: Option<f64>) -> FaultEvent {
    FaultEvent {
        kind,
        at_ms,
        workers: vec!["w<1>".into()],
        until_ms,
    }
}

#[test]
fn chart_is_well_formed_with_a_marker_per_fault() {
    let records = sample_records(60);
    let faults = [
        fault(FaultKind::Crash, 1200.0, None),
        fault(FaultKind::Freeze, 2000.0, Some(3500.0)),
        fault(FaultKind::BrokerOutage, 4000.0, None),
        fault(FaultKind::Start, 4500.0, None),
    ];
    let svg = render_svg(&records, &faults, Duration::from_secs(7));
    assert_well_formed(&svg);
    assert_eq!(svg.matches(r#"class="fault""#).count(), faults.len());
    assert_eq!(svg.matches(r#"class="fault-label""#).count(), faults.len());
    assert_eq!(
        svg.matches(r#"class="fault-span""#).count(),
        2,
        "freeze and broker outage are shaded"
    );
    for name in ["crash", "freeze", "broker outage", "start"] {
        assert!(svg.contains(&format!(">{name} w&lt;1&gt;</text>")), "{name}");
    }
    // One dot per response, one cross per error reply.
    assert_eq!(
        svg.matches("<circle ").count(),
        60 + 1,
        "60 responses and the legend's dot"
    );
    assert_eq!(svg.matches(r#"<path d="M"#).count(), 1 + 1);
    assert!(svg.contains("answers/s") && svg.contains("tokens/s") && svg.contains("time since start (s)"));
}

#[test]
fn empty_run_still_draws_axes() {
    let svg = render_svg(&[], &[], Duration::ZERO);
    assert_well_formed(&svg);
    assert!(svg.contains("total latency (ms)"));
    assert!(!svg.contains(r#"class="fault""#));
}

#[test]
fn ticks_are_round_numbers() {
    assert_eq!(
        Scale::new((0.0, 10.0), (0.0, 1.0)).ticks(),
        [0.0, 2.0, 4.0, 6.0, 8.0, 10.0]
    );
    assert_eq!(Scale::new((0.0, 37.0), (0.0, 1.0)).ticks().last(), Some(&30.0));
    assert_eq!(nice_ceiling(37.0), 40.0);
    assert_eq!(nice_ceiling(0.0), 1.0);
    assert_eq!(nice_ceiling(1234.0), 1500.0);
    assert_eq!(label(0.5), "0.5");
    assert_eq!(label(3.0), "3");
}

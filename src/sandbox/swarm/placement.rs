//! Where a new user's sandbox goes: a pure choice over the node inventory, unit-tested here.

use std::collections::HashMap;

use super::nodes::Node;

/// The node for a new sandbox: among nodes that take new sandboxes (ready, active, usable by
/// sandboxd, carrying every required label), the one with the most memory left after its live
/// sandboxes' limits, then the fewest live sandboxes, then by hostname (a stable order).
/// `None` when no node qualifies.
pub fn choose<'a>(
    nodes: &'a [Node],
    usable: impl Fn(&Node) -> bool,
    live: &HashMap<String, usize>,
    labels: &[(String, String)],
    memory_per_sandbox: i64,
) -> Option<&'a Node> {
    nodes
        .iter()
        .filter(|n| n.accepts_new() && usable(n))
        .filter(|n| {
            labels
                .iter()
                .all(|(k, v)| n.labels.get(k).is_some_and(|have| have == v))
        })
        .min_by_key(|n| {
            let count = live.get(&n.id).copied().unwrap_or(0);
            let free = n
                .memory_bytes
                .saturating_sub(count as i64 * memory_per_sandbox);
            (std::cmp::Reverse(free), count, n.hostname.clone())
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(
        id: &str,
        state: &str,
        availability: &str,
        mem_gib: i64,
        labels: &[(&str, &str)],
    ) -> Node {
        Node {
            id: id.into(),
            hostname: format!("host-{id}"),
            addr: "10.0.0.1".into(),
            ready: state == "ready",
            state: state.into(),
            availability: availability.into(),
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            memory_bytes: mem_gib << 30,
            nano_cpus: 2_000_000_000,
        }
    }

    const GIB: i64 = 1 << 30;

    fn pick(nodes: &[Node], live: &[(&str, usize)], labels: &[(&str, &str)]) -> Option<String> {
        let live = live.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect();
        let labels: Vec<_> = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        choose(nodes, |_| true, &live, &labels, GIB / 2).map(|n| n.id.clone())
    }

    #[test]
    fn spreads_by_free_memory_then_count() {
        let nodes = vec![
            node("a", "ready", "active", 8, &[]),
            node("b", "ready", "active", 8, &[]),
            node("c", "ready", "active", 8, &[]),
        ];
        // Empty: the first by hostname.
        assert_eq!(pick(&nodes, &[], &[]).as_deref(), Some("a"));
        assert_eq!(pick(&nodes, &[("a", 1)], &[]).as_deref(), Some("b"));
        assert_eq!(
            pick(&nodes, &[("a", 1), ("b", 1)], &[]).as_deref(),
            Some("c")
        );
        assert_eq!(
            pick(&nodes, &[("a", 2), ("b", 1), ("c", 3)], &[]).as_deref(),
            Some("b")
        );
        // A bigger node takes more before a smaller one gets its turn.
        let mixed = vec![
            node("big", "ready", "active", 16, &[]),
            node("small", "ready", "active", 4, &[]),
        ];
        assert_eq!(pick(&mixed, &[("big", 20)], &[]).as_deref(), Some("big"));
        assert_eq!(pick(&mixed, &[("big", 25)], &[]).as_deref(), Some("small"));
    }

    #[test]
    fn honours_state_availability_labels_and_usability() {
        let nodes = vec![
            node("down", "down", "active", 64, &[("sandboxd", "true")]),
            node("drained", "ready", "drain", 64, &[("sandboxd", "true")]),
            node("paused", "ready", "pause", 64, &[("sandboxd", "true")]),
            node("plain", "ready", "active", 32, &[]),
            node("ok", "ready", "active", 8, &[("sandboxd", "true")]),
        ];
        assert_eq!(pick(&nodes, &[], &[]).as_deref(), Some("plain"));
        assert_eq!(
            pick(&nodes, &[], &[("sandboxd", "true")]).as_deref(),
            Some("ok")
        );
        assert_eq!(pick(&nodes, &[], &[("sandboxd", "false")]), None);
        let live = HashMap::new();
        let unusable = choose(&nodes, |n| n.id != "plain", &live, &[], GIB);
        assert_eq!(unusable.map(|n| n.id.as_str()), Some("ok"));
        assert!(choose(&nodes, |_| false, &live, &[], GIB).is_none());
        assert!(choose(&[], |_| true, &live, &[], GIB).is_none());
    }
}

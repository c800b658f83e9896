//! How a search reads the fleet: which ranges of the name order, and in
//! which order it checks the operands ANDed at the query's top.
//!
//! The parser already puts cheap operands first; what it cannot know is
//! how often each one holds. A sample of the things to be read tells:
//! checking first the operand that rejects most things for its cost makes
//! every other check rarer (`battery<1` before `mode:off`).

use crate::search::{Field, Query, Term, Test};

/// Things a plan samples to order its operands.
const SAMPLES: usize = 256;

pub(super) struct Plan<'q> {
    /// Name prefixes one of which every match has, when the query says so:
    /// sorted, none the prefix of another, so their ranges of the name
    /// order are apart and in order.
    pub prefixes: Option<Vec<&'q str>>,
    /// The operands ANDed at the query's top still to check in those
    /// ranges (all of them when there are none).
    pub operands: Vec<&'q Query>,
}

impl<'q> Plan<'q> {
    pub fn new(query: &'q Query) -> Plan<'q> {
        let mut operands = Vec::new();
        and_operands(query, &mut operands);
        // An operand that only ORs name prefixes gives the ranges, and
        // holds everywhere in them.
        if let Some(at) = operands.iter().position(|q| only_name_prefixes(q)) {
            let given = operands.remove(at);
            return Plan {
                prefixes: name_prefixes(given),
                operands,
            };
        }
        Plan {
            prefixes: name_prefixes(query),
            operands,
        }
    }

    /// Orders the operands by their cost over the share they reject of
    /// [`SAMPLES`] things spread over `ranges` (`holds` says whether an
    /// operand holds on a thing), least first. Ties keep the query's order.
    pub fn order(&mut self, ranges: &[&[u32]], mut holds: impl FnMut(&Query, u32) -> bool) {
        if self.operands.len() < 2 {
            return;
        }
        let candidates: usize = ranges.iter().map(|range| range.len()).sum();
        let step = (candidates / SAMPLES).max(1);
        let samples: Vec<u32> = ranges
            .iter()
            .flat_map(|range| range.iter().step_by(step))
            .copied()
            .collect();
        if samples.is_empty() {
            return;
        }
        let mut keyed: Vec<(f64, &'q Query)> = self
            .operands
            .iter()
            .map(|&operand| {
                let rejected = samples.iter().filter(|&&s| !holds(operand, s)).count();
                let share = rejected as f64 / samples.len() as f64;
                (
                    operand.cost() as f64 / share.max(0.5 / SAMPLES as f64),
                    operand,
                )
            })
            .collect();
        keyed.sort_by(|a, b| a.0.total_cmp(&b.0));
        self.operands = keyed.into_iter().map(|(_, operand)| operand).collect();
    }
}

fn and_operands<'q>(query: &'q Query, into: &mut Vec<&'q Query>) {
    match query {
        Query::And(a, b) => {
            and_operands(a, into);
            and_operands(b, into);
        }
        other => into.push(other),
    }
}

/// `thingName:abc*`, or an OR of such.
fn only_name_prefixes(query: &Query) -> bool {
    match query {
        Query::Or(a, b) => only_name_prefixes(a) && only_name_prefixes(b),
        Query::Term(term) => name_prefix_of(term).is_some_and(|(_, wildcard)| wildcard),
        _ => false,
    }
}

/// The prefixes (see [`Plan::prefixes`]) `query` bounds names to: a name
/// term ANDed at its top, or an OR of such.
fn name_prefixes(query: &Query) -> Option<Vec<&str>> {
    let mut prefixes = name_prefixes_of(query)?;
    prefixes.sort_unstable();
    prefixes.dedup_by(|later, earlier| later.starts_with(*earlier));
    Some(prefixes)
}

fn name_prefixes_of(query: &Query) -> Option<Vec<&str>> {
    match query {
        Query::And(a, b) => name_prefixes_of(a).or_else(|| name_prefixes_of(b)),
        Query::Or(a, b) => {
            let mut prefixes = name_prefixes_of(a)?;
            prefixes.extend(name_prefixes_of(b)?);
            Some(prefixes)
        }
        Query::Term(term) => name_prefix_of(term).map(|(prefix, _)| vec![prefix]),
        Query::Not(_) => None,
    }
}

/// The prefix every name `term` holds for has: `thingName:abc*` (then
/// `true`: it holds for every such name) or an exact `thingName:abc`.
fn name_prefix_of(term: &Term) -> Option<(&str, bool)> {
    let Term {
        field: Field::ThingName,
        test: Test::Equals(literal),
    } = term
    else {
        return None;
    };
    match literal.wildcard {
        false => Some((&literal.text, false)),
        true => literal
            .text
            .strip_suffix('*')
            .filter(|prefix| !prefix.contains('*'))
            .map(|prefix| (prefix, true)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(query: &Query) -> (Option<Vec<&str>>, usize) {
        let plan = Plan::new(query);
        (plan.prefixes, plan.operands.len())
    }

    #[test]
    fn name_terms_bound_the_ranges_and_a_pure_prefix_operand_is_not_checked() {
        let parse = |q: &str| Query::parse(q).expect("query");
        let q = parse("thingName:b* OR thingName:a* OR thingName:ab*");
        assert_eq!(plan(&q), (Some(vec!["a", "b"]), 0));
        let q = parse("(thingName:gw-* OR thingName:lamp-*) AND shadow.reported.x:1");
        assert_eq!(plan(&q), (Some(vec!["gw-", "lamp-"]), 1));
        // An exact name bounds the range, but the range holds longer names.
        let q = parse("thingName:gw-1 AND shadow.reported.x:1");
        assert_eq!(plan(&q), (Some(vec!["gw-1"]), 2));
        let q = parse("(thingName:a* AND shadow.reported.x:1) OR thingName:b*");
        assert_eq!(plan(&q), (Some(vec!["a", "b"]), 1));
        let q = parse("thingName:a* OR shadow.reported.x:1");
        assert_eq!(plan(&q), (None, 1));
        let q = parse("NOT thingName:a*");
        assert_eq!(plan(&q), (None, 1));
        let q = parse("thingName:a*b*");
        assert_eq!(plan(&q), (None, 1));
    }

    #[test]
    fn the_operand_that_rejects_most_for_its_cost_goes_first() {
        let query = Query::parse(
            "shadow.reported.mode:off AND shadow.reported.battery:1 AND shadow.reported.x:1",
        )
        .expect("query");
        let mut plan = Plan::new(&query);
        let texts: Vec<String> = plan.operands.iter().map(|q| format!("{q:?}")).collect();
        // mode holds for half the samples, battery for one in a hundred,
        // x for every one.
        let things: Vec<u32> = (0..100).collect();
        plan.order(&[&things], |q, s| {
            let text = format!("{q:?}");
            match () {
                _ if text.contains("mode") => s % 2 == 0,
                _ if text.contains("battery") => s == 7,
                _ => true,
            }
        });
        let ordered: Vec<String> = plan.operands.iter().map(|q| format!("{q:?}")).collect();
        assert_eq!(ordered.len(), 3);
        assert!(ordered[0].contains("battery"), "{ordered:?}");
        assert!(ordered[1].contains("mode"), "{ordered:?}");
        assert!(ordered[2].contains("\"x\""), "{ordered:?} from {texts:?}");
    }
}

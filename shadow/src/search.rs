//! Fleet search queries: a subset of AWS IoT fleet-indexing syntax, parsed
//! into a [`Query`] and evaluated against any [`ThingFields`].
//!
//! ```text
//! thingName:sensor-*            shadow.reported.temp>30      shadow.desired.mode:eco
//! shadow.hasDelta:true          shadow.name.cfg.reported.x:5 connectivity.connected:true
//! shadow.version:[2 TO 10]      NOT (a:1 OR b:{1 TO *})      shadow.reported.fw:*
//! ```
//! Terms joined by whitespace are ANDed; `NOT` binds tighter than `AND`, which
//! binds tighter than `OR`. A bare word matches the thing name. `*` inside a
//! value is a wildcard; a value that is only `*` asks that the field exists.
//! Arrays match when any element matches.

use std::cmp::Ordering;

use serde_json::Value;

use crate::document::ShadowState;

/// Longest query accepted, in bytes.
pub const MAX_QUERY_BYTES: usize = 4096;
/// Deepest nesting of parentheses and `NOT`s accepted.
const MAX_NESTING: usize = 32;

/// A thing as a query sees it.
pub trait ThingFields {
    fn thing_name(&self) -> &str;
    /// `(connected, last seen in epoch milliseconds)`, if ever seen.
    fn connectivity(&self) -> Option<(bool, i64)>;
    /// The classic shadow (`None`) or a named one, if it exists.
    fn shadow(&self, name: Option<&str>) -> Option<ShadowFields<'_>>;
}

/// One shadow as a query sees it.
#[derive(Debug, Clone, Copy)]
pub struct ShadowFields<'a> {
    pub version: u64,
    pub state: &'a ShadowState,
    pub has_delta: bool,
}

/// A parsed query.
#[derive(Debug, Clone, PartialEq)]
pub enum Query {
    And(Box<Query>, Box<Query>),
    Or(Box<Query>, Box<Query>),
    Not(Box<Query>),
    Term(Term),
}

/// One `field <test>` term.
#[derive(Debug, Clone, PartialEq)]
pub struct Term {
    pub field: Field,
    pub test: Test,
}

/// What a term looks at.
#[derive(Debug, Clone, PartialEq)]
pub enum Field {
    ThingName,
    Connected,
    /// Last seen, epoch milliseconds.
    ConnectivityTimestamp,
    Shadow {
        /// `None` for the classic shadow.
        name: Option<String>,
        part: ShadowPart,
    },
}

/// Which part of a shadow a term looks at.
#[derive(Debug, Clone, PartialEq)]
pub enum ShadowPart {
    Desired(Vec<String>),
    Reported(Vec<String>),
    HasDelta,
    Version,
}

/// How a term tests its field.
#[derive(Debug, Clone, PartialEq)]
pub enum Test {
    /// `field:*`
    Exists,
    /// `field:value` (with `*` wildcards in strings)
    Equals(Literal),
    /// `field>value` and friends.
    Compare(Comparison, Literal),
    /// `field:[lo TO hi]`; `{`/`}` exclude the bound, `*` leaves it open.
    Range {
        low: Option<Bound>,
        high: Option<Bound>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Comparison {
    Less,
    LessOrEqual,
    Greater,
    GreaterOrEqual,
}

/// One end of a range.
#[derive(Debug, Clone, PartialEq)]
pub struct Bound {
    pub value: Literal,
    pub inclusive: bool,
}

/// A value as written in the query; `number` when it reads as one.
#[derive(Debug, Clone, PartialEq)]
pub struct Literal {
    pub text: String,
    pub number: Option<f64>,
    /// Whether `text` holds `*` wildcards (unquoted values only).
    pub wildcard: bool,
}

impl Literal {
    fn new(text: String, quoted: bool) -> Literal {
        let number = if quoted {
            None
        } else {
            text.parse::<f64>().ok().filter(|n| n.is_finite())
        };
        Literal {
            wildcard: !quoted && text.contains('*'),
            number,
            text,
        }
    }
}

/// Why a query could not be parsed, and where (byte offset).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind} at position {position}")]
pub struct ParseError {
    pub position: usize,
    pub kind: ParseErrorKind,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseErrorKind {
    #[error("empty query")]
    Empty,
    #[error("query is too long")]
    TooLong,
    #[error("query is nested too deeply")]
    TooDeep,
    #[error("unexpected end of query")]
    UnexpectedEnd,
    #[error("unexpected '{0}'")]
    Unexpected(char),
    #[error("unknown field")]
    UnknownField,
    #[error("missing value")]
    MissingValue,
    #[error("unclosed quote")]
    UnclosedQuote,
    #[error("expected 'TO'")]
    ExpectedTo,
    #[error("expected ']' or '}}'")]
    UnclosedRange,
    #[error("expected ')'")]
    UnclosedParen,
    #[error("comparison needs a value")]
    BadComparison,
}

impl Query {
    /// Parses a query string.
    pub fn parse(input: &str) -> Result<Query, ParseError> {
        if input.len() > MAX_QUERY_BYTES {
            return Err(ParseError {
                position: MAX_QUERY_BYTES,
                kind: ParseErrorKind::TooLong,
            });
        }
        let mut parser = Parser {
            input,
            pos: 0,
            depth: 0,
        };
        parser.skip_space();
        if parser.at_end() {
            return Err(parser.error(ParseErrorKind::Empty));
        }
        let query = parser.or()?;
        parser.skip_space();
        match parser.peek() {
            None => Ok(query.cheapest_first()),
            Some(c) => Err(parser.error(ParseErrorKind::Unexpected(c))),
        }
    }

    /// A rough cost of evaluating the query on one thing: the name is at
    /// hand, connectivity a field away, a state path several map lookups.
    pub fn cost(&self) -> usize {
        match self {
            Query::And(a, b) | Query::Or(a, b) => a.cost() + b.cost(),
            Query::Not(q) => q.cost(),
            Query::Term(term) => match &term.field {
                Field::ThingName => 1,
                Field::Connected | Field::ConnectivityTimestamp => 2,
                Field::Shadow { part, .. } => match part {
                    ShadowPart::HasDelta | ShadowPart::Version => 3,
                    ShadowPart::Desired(path) | ShadowPart::Reported(path) => 4 + path.len(),
                },
            },
        }
    }

    /// The same query with the operands of each AND chain and each OR chain
    /// sorted cheapest first (both are commutative here: evaluation has no
    /// side effects), so that short-circuiting skips the costly lookups.
    fn cheapest_first(self) -> Query {
        fn flatten(query: Query, and: bool, into: &mut Vec<Query>) {
            match query {
                Query::And(a, b) if and => {
                    flatten(*a, and, into);
                    flatten(*b, and, into);
                }
                Query::Or(a, b) if !and => {
                    flatten(*a, and, into);
                    flatten(*b, and, into);
                }
                other => into.push(other.cheapest_first()),
            }
        }
        let and = match &self {
            Query::And(..) => true,
            Query::Or(..) => false,
            Query::Not(_) | Query::Term(_) => {
                return match self {
                    Query::Not(q) => Query::Not(Box::new(q.cheapest_first())),
                    other => other,
                }
            }
        };
        let mut operands = Vec::new();
        flatten(self, and, &mut operands);
        operands.sort_by_key(Query::cost);
        let mut operands = operands.into_iter();
        let first = operands.next();
        operands
            .fold(first, |acc, next| {
                let acc = acc?;
                Some(if and {
                    Query::And(Box::new(acc), Box::new(next))
                } else {
                    Query::Or(Box::new(acc), Box::new(next))
                })
            })
            // A chain has at least two operands; the fallback cannot happen.
            .unwrap_or(Query::Term(Term {
                field: Field::ThingName,
                test: Test::Exists,
            }))
    }

    /// Whether `thing` matches.
    pub fn matches(&self, thing: &dyn ThingFields) -> bool {
        self.matches_with(&mut |term| term.matches(thing))
    }

    /// Whether the query holds when each term holds as `term` says (terms
    /// are asked in query order, and only as far as the answer needs).
    pub fn matches_with(&self, term: &mut impl FnMut(&Term) -> bool) -> bool {
        match self {
            Query::And(a, b) => a.matches_with(term) && b.matches_with(term),
            Query::Or(a, b) => a.matches_with(term) || b.matches_with(term),
            Query::Not(q) => !q.matches_with(term),
            Query::Term(t) => term(t),
        }
    }

    /// The terms, in the order [`matches_with`](Self::matches_with) meets them.
    pub fn terms(&self) -> Vec<&Term> {
        let mut out = Vec::new();
        self.collect_terms(&mut out);
        out
    }

    fn collect_terms<'a>(&'a self, out: &mut Vec<&'a Term>) {
        match self {
            Query::And(a, b) | Query::Or(a, b) => {
                a.collect_terms(out);
                b.collect_terms(out);
            }
            Query::Not(q) => q.collect_terms(out),
            Query::Term(t) => out.push(t),
        }
    }
}

impl Term {
    /// Whether `thing` passes this term.
    pub fn matches(&self, thing: &dyn ThingFields) -> bool {
        match &self.field {
            Field::ThingName => self.test.matches_scalar(Scalar::Text(thing.thing_name())),
            Field::Connected => thing
                .connectivity()
                .is_some_and(|(connected, _)| self.test.matches_scalar(Scalar::Bool(connected))),
            Field::ConnectivityTimestamp => thing
                .connectivity()
                .is_some_and(|(_, at)| self.test.matches_scalar(Scalar::Number(at as f64))),
            Field::Shadow { name, part } => {
                let Some(shadow) = thing.shadow(name.as_deref()) else {
                    return false;
                };
                match part {
                    ShadowPart::HasDelta => {
                        self.test.matches_scalar(Scalar::Bool(shadow.has_delta))
                    }
                    ShadowPart::Version => self
                        .test
                        .matches_scalar(Scalar::Number(shadow.version as f64)),
                    ShadowPart::Desired(path) => shadow
                        .state
                        .desired
                        .as_ref()
                        .and_then(|s| lookup(&s.state, path))
                        .is_some_and(|v| self.test.matches(v)),
                    ShadowPart::Reported(path) => shadow
                        .state
                        .reported
                        .as_ref()
                        .and_then(|s| lookup(&s.state, path))
                        .is_some_and(|v| self.test.matches(v)),
                }
            }
        }
    }
}

fn lookup<'a>(object: &'a serde_json::Map<String, Value>, path: &[String]) -> Option<&'a Value> {
    let (first, rest) = path.split_first()?;
    let mut value = object.get(first)?;
    for key in rest {
        value = value.as_object()?.get(key)?;
    }
    Some(value)
}

/// A leaf value as a test sees it (borrowed: no allocation per thing).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Scalar<'a> {
    Text(&'a str),
    Number(f64),
    Bool(bool),
    Null,
    /// An object: only `field:*` matches it.
    Object,
}

impl Test {
    /// Whether `value` passes; an array passes when any element does.
    pub fn matches(&self, value: &Value) -> bool {
        let scalar = match value {
            Value::Array(items) => {
                return matches!(self, Test::Exists) || items.iter().any(|v| self.matches(v))
            }
            Value::String(s) => Scalar::Text(s),
            Value::Number(n) => match n.as_f64() {
                Some(n) => Scalar::Number(n),
                None => return false,
            },
            Value::Bool(b) => Scalar::Bool(*b),
            Value::Null => Scalar::Null,
            Value::Object(_) => Scalar::Object,
        };
        self.matches_scalar(scalar)
    }

    /// Whether a leaf value passes.
    pub fn matches_scalar(&self, value: Scalar<'_>) -> bool {
        match self {
            Test::Exists => !matches!(value, Scalar::Null),
            Test::Equals(literal) => equals(value, literal),
            Test::Compare(op, literal) => compare(value, literal).is_some_and(|ord| match op {
                Comparison::Less => ord == Ordering::Less,
                Comparison::LessOrEqual => ord != Ordering::Greater,
                Comparison::Greater => ord == Ordering::Greater,
                Comparison::GreaterOrEqual => ord != Ordering::Less,
            }),
            Test::Range { low, high } => {
                let within = |bound: &Option<Bound>, beyond: Ordering| match bound {
                    None => true,
                    Some(b) => compare(value, &b.value).is_some_and(|ord| {
                        ord == beyond || (b.inclusive && ord == Ordering::Equal)
                    }),
                };
                let low_ok = within(low, Ordering::Greater);
                let high_ok = within(high, Ordering::Less);
                // `[* TO *]` still needs a value that orders.
                low_ok && high_ok && matches!(value, Scalar::Text(_) | Scalar::Number(_))
            }
        }
    }
}

fn equals(value: Scalar<'_>, literal: &Literal) -> bool {
    match value {
        Scalar::Text(s) if literal.wildcard => glob(&literal.text, s),
        Scalar::Text(s) => s == literal.text,
        Scalar::Number(n) => literal.number == Some(n),
        Scalar::Bool(b) => literal.text == if b { "true" } else { "false" },
        Scalar::Null => literal.text == "null",
        Scalar::Object => false,
    }
}

/// Orders `value` against `literal`: numbers by value, strings by text.
fn compare(value: Scalar<'_>, literal: &Literal) -> Option<Ordering> {
    match value {
        Scalar::Number(n) => n.partial_cmp(&literal.number?),
        Scalar::Text(s) => Some(s.cmp(literal.text.as_str())),
        _ => None,
    }
}

/// `*` matches any run of characters; everything else matches itself.
pub fn glob(pattern: &str, text: &str) -> bool {
    let p = pattern.as_bytes();
    let t = text.as_bytes();
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, ti));
            pi += 1;
        } else if pi < p.len() && p[pi] == t[ti] {
            pi += 1;
            ti += 1;
        } else if let Some((sp, st)) = star {
            // Let the last star swallow one more character and retry.
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

/// A recursive-descent parser over the query's bytes.
struct Parser<'a> {
    input: &'a str,
    pos: usize,
    depth: usize,
}

impl<'a> Parser<'a> {
    fn error(&self, kind: ParseErrorKind) -> ParseError {
        ParseError {
            position: self.pos,
            kind,
        }
    }

    fn error_at(&self, position: usize, kind: ParseErrorKind) -> ParseError {
        ParseError { position, kind }
    }

    fn peek(&self) -> Option<char> {
        self.input[self.pos..].chars().next()
    }

    fn at_end(&self) -> bool {
        self.pos >= self.input.len()
    }

    fn bump(&mut self) -> Option<char> {
        let c = self.peek()?;
        self.pos += c.len_utf8();
        Some(c)
    }

    fn skip_space(&mut self) {
        while self.peek().is_some_and(char::is_whitespace) {
            self.bump();
        }
    }

    /// Consumes `word` if it comes next as a whole word.
    fn keyword(&mut self, word: &str) -> bool {
        let rest = &self.input[self.pos..];
        if rest.starts_with(word)
            && rest[word.len()..]
                .chars()
                .next()
                .is_none_or(|c| c.is_whitespace() || c == '(' || c == ')')
        {
            self.pos += word.len();
            true
        } else {
            false
        }
    }

    fn nest(&mut self) -> Result<(), ParseError> {
        self.depth += 1;
        if self.depth > MAX_NESTING {
            return Err(self.error(ParseErrorKind::TooDeep));
        }
        Ok(())
    }

    fn or(&mut self) -> Result<Query, ParseError> {
        let mut left = self.and()?;
        loop {
            self.skip_space();
            if !self.keyword("OR") {
                return Ok(left);
            }
            let right = self.and()?;
            left = Query::Or(Box::new(left), Box::new(right));
        }
    }

    fn and(&mut self) -> Result<Query, ParseError> {
        let mut left = self.unary()?;
        loop {
            self.skip_space();
            let save = self.pos;
            if self.keyword("AND") {
                let right = self.unary()?;
                left = Query::And(Box::new(left), Box::new(right));
                continue;
            }
            // Juxtaposed terms are ANDed; stop before OR, ')' or the end.
            if self.at_end() || self.peek() == Some(')') || self.keyword("OR") {
                self.pos = save;
                return Ok(left);
            }
            let right = self.unary()?;
            left = Query::And(Box::new(left), Box::new(right));
        }
    }

    fn unary(&mut self) -> Result<Query, ParseError> {
        self.skip_space();
        if self.keyword("NOT") {
            self.nest()?;
            let inner = self.unary()?;
            self.depth -= 1;
            return Ok(Query::Not(Box::new(inner)));
        }
        match self.peek() {
            None => Err(self.error(ParseErrorKind::UnexpectedEnd)),
            Some('(') => {
                let open = self.pos;
                self.bump();
                self.nest()?;
                let inner = self.or()?;
                self.depth -= 1;
                self.skip_space();
                match self.peek() {
                    Some(')') => {
                        self.bump();
                        Ok(inner)
                    }
                    None => Err(self.error_at(open, ParseErrorKind::UnclosedParen)),
                    Some(c) => Err(self.error(ParseErrorKind::Unexpected(c))),
                }
            }
            Some(_) => self.term().map(Query::Term),
        }
    }

    fn term(&mut self) -> Result<Term, ParseError> {
        let start = self.pos;
        while self
            .peek()
            .is_some_and(|c| !(c.is_whitespace() || "():<>=\"[]{}".contains(c)))
        {
            self.bump();
        }
        let name = &self.input[start..self.pos];
        if name.is_empty() {
            let c = self.peek().unwrap_or(' ');
            return Err(self.error(ParseErrorKind::Unexpected(c)));
        }
        let op_at = self.pos;
        match self.peek() {
            // A bare word: the thing's name.
            None | Some(' ' | '\t' | '\n' | '\r' | ')' | '(') => {
                let literal = Literal::new(name.to_string(), false);
                return Ok(Term {
                    field: Field::ThingName,
                    test: if literal.text == "*" {
                        Test::Exists
                    } else {
                        Test::Equals(literal)
                    },
                });
            }
            _ => {}
        }
        let field =
            parse_field(name).ok_or_else(|| self.error_at(start, ParseErrorKind::UnknownField))?;
        let test = match self.bump() {
            Some(':') => match self.peek() {
                Some('<' | '>') => self.comparison()?,
                Some('[' | '{') => self.range()?,
                _ => {
                    let literal = self.value()?;
                    if literal.text == "*" && literal.wildcard {
                        Test::Exists
                    } else {
                        Test::Equals(literal)
                    }
                }
            },
            Some('<' | '>') => {
                self.pos = op_at;
                self.comparison()?
            }
            Some(c) => return Err(self.error_at(op_at, ParseErrorKind::Unexpected(c))),
            None => return Err(self.error(ParseErrorKind::UnexpectedEnd)),
        };
        Ok(Term { field, test })
    }

    fn comparison(&mut self) -> Result<Test, ParseError> {
        let op = match self.bump() {
            Some('<') => Comparison::Less,
            _ => Comparison::Greater,
        };
        let op = if self.peek() == Some('=') {
            self.bump();
            match op {
                Comparison::Less => Comparison::LessOrEqual,
                _ => Comparison::GreaterOrEqual,
            }
        } else {
            op
        };
        let at = self.pos;
        let literal = self.value()?;
        if literal.wildcard {
            return Err(self.error_at(at, ParseErrorKind::BadComparison));
        }
        Ok(Test::Compare(op, literal))
    }

    fn range(&mut self) -> Result<Test, ParseError> {
        let low_inclusive = self.bump() == Some('[');
        self.skip_space();
        let low = self.range_value()?;
        self.skip_space();
        if !self.keyword("TO") {
            return Err(self.error(ParseErrorKind::ExpectedTo));
        }
        self.skip_space();
        let high = self.range_value()?;
        self.skip_space();
        let high_inclusive = match self.peek() {
            Some(']') => true,
            Some('}') => false,
            _ => return Err(self.error(ParseErrorKind::UnclosedRange)),
        };
        self.bump();
        let bound =
            |value: Option<Literal>, inclusive| value.map(|value| Bound { value, inclusive });
        Ok(Test::Range {
            low: bound(low, low_inclusive),
            high: bound(high, high_inclusive),
        })
    }

    /// A range bound; `*` is an open end.
    fn range_value(&mut self) -> Result<Option<Literal>, ParseError> {
        let start = self.pos;
        if self.peek() == Some('"') {
            return self.value().map(Some);
        }
        while self
            .peek()
            .is_some_and(|c| !(c.is_whitespace() || "[]{}()\"".contains(c)))
        {
            self.bump();
        }
        let text = &self.input[start..self.pos];
        match text {
            "" => Err(self.error(ParseErrorKind::MissingValue)),
            "*" => Ok(None),
            _ => Ok(Some(Literal::new(text.to_string(), true).with_number())),
        }
    }

    /// A value: `"quoted"` (with `\"` and `\\`) or a bare run up to whitespace or `)`.
    fn value(&mut self) -> Result<Literal, ParseError> {
        let start = self.pos;
        if self.peek() == Some('"') {
            self.bump();
            let mut text = String::new();
            loop {
                match self.bump() {
                    None => return Err(self.error_at(start, ParseErrorKind::UnclosedQuote)),
                    Some('"') => return Ok(Literal::new(text, true)),
                    Some('\\') => match self.bump() {
                        Some(c) => text.push(c),
                        None => return Err(self.error_at(start, ParseErrorKind::UnclosedQuote)),
                    },
                    Some(c) => text.push(c),
                }
            }
        }
        while self
            .peek()
            .is_some_and(|c| !(c.is_whitespace() || c == ')' || c == '(' || c == '"'))
        {
            self.bump();
        }
        let text = &self.input[start..self.pos];
        if text.is_empty() {
            return Err(self.error(ParseErrorKind::MissingValue));
        }
        Ok(Literal::new(text.to_string(), false))
    }
}

impl Literal {
    /// Range bounds are never wildcards but may be numbers.
    fn with_number(mut self) -> Literal {
        self.number = self.text.parse::<f64>().ok().filter(|n| n.is_finite());
        self
    }
}

/// Maps a field name to a [`Field`]; `None` when it names nothing searchable.
fn parse_field(name: &str) -> Option<Field> {
    match name {
        "thingName" => return Some(Field::ThingName),
        "connectivity.connected" => return Some(Field::Connected),
        "connectivity.timestamp" => return Some(Field::ConnectivityTimestamp),
        _ => {}
    }
    let rest = name.strip_prefix("shadow.")?;
    let (shadow_name, rest) = match rest.strip_prefix("name.") {
        Some(named) => {
            let (shadow_name, rest) = named.split_once('.')?;
            if shadow_name.is_empty() {
                return None;
            }
            (Some(shadow_name.to_string()), rest)
        }
        None => (None, rest),
    };
    let path = |tail: &str| -> Option<Vec<String>> {
        let segments: Vec<String> = tail.split('.').map(str::to_string).collect();
        (!segments.iter().any(String::is_empty)).then_some(segments)
    };
    let part = match rest {
        "hasDelta" => ShadowPart::HasDelta,
        "version" => ShadowPart::Version,
        _ => {
            if let Some(tail) = rest.strip_prefix("desired.") {
                ShadowPart::Desired(path(tail)?)
            } else if let Some(tail) = rest.strip_prefix("reported.") {
                ShadowPart::Reported(path(tail)?)
            } else {
                return None;
            }
        }
    };
    Some(Field::Shadow {
        name: shadow_name,
        part,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::document::{Section, ShadowState};
    use serde_json::json;

    struct Thing {
        name: &'static str,
        connectivity: Option<(bool, i64)>,
        classic: Option<(u64, ShadowState)>,
        named: Vec<(&'static str, u64, ShadowState)>,
    }

    impl ThingFields for Thing {
        fn thing_name(&self) -> &str {
            self.name
        }
        fn connectivity(&self) -> Option<(bool, i64)> {
            self.connectivity
        }
        fn shadow(&self, name: Option<&str>) -> Option<ShadowFields<'_>> {
            let (version, state) = match name {
                None => self.classic.as_ref().map(|(v, s)| (*v, s))?,
                Some(n) => self
                    .named
                    .iter()
                    .find(|(m, _, _)| *m == n)
                    .map(|(_, v, s)| (*v, s))?,
            };
            Some(ShadowFields {
                version,
                state,
                has_delta: state.delta().is_some(),
            })
        }
    }

    fn state(desired: Value, reported: Value) -> ShadowState {
        let section = |v: Value| match v {
            Value::Object(state) => Some(Section {
                state,
                metadata: Default::default(),
            }),
            _ => None,
        };
        ShadowState {
            desired: section(desired),
            reported: section(reported),
        }
    }

    fn sensor() -> Thing {
        Thing {
            name: "sensor-7",
            connectivity: Some((true, 1_700_000_000_000)),
            classic: Some((
                3,
                state(
                    json!({"mode": "eco", "temp": 20}),
                    json!({"mode": "eco", "temp": 31.5, "tags": ["a", "b"], "fw": {"v": "1.2"}}),
                ),
            )),
            named: vec![("cfg", 9, state(json!(null), json!({"x": 5})))],
        }
    }

    fn check(query: &str) -> bool {
        match Query::parse(query) {
            Ok(q) => q.matches(&sensor()),
            Err(e) => panic!("{query}: {e}"),
        }
    }

    #[test]
    fn terms_match() {
        for (query, want) in [
            ("thingName:sensor-*", true),
            ("thingName:sensor-7", true),
            ("thingName:*-7", true),
            ("thingName:lamp*", false),
            ("sensor-7", true),
            ("shadow.reported.temp>30", true),
            ("shadow.reported.temp:>30", true),
            ("shadow.reported.temp>=31.5", true),
            ("shadow.reported.temp<31.5", false),
            ("shadow.reported.temp<=31.5", true),
            ("shadow.desired.mode:eco", true),
            ("shadow.desired.mode:\"eco\"", true),
            ("shadow.desired.mode:ECO", false),
            ("shadow.hasDelta:true", true),
            ("shadow.hasDelta:false", false),
            ("shadow.version:3", true),
            ("shadow.name.cfg.reported.x:5", true),
            ("shadow.name.cfg.reported.x:5.0", true),
            ("shadow.name.cfg.hasDelta:false", true),
            ("shadow.name.other.reported.x:5", false),
            ("connectivity.connected:true", true),
            ("connectivity.timestamp>1600000000000", true),
            ("shadow.reported.temp:[30 TO 32]", true),
            ("shadow.reported.temp:{31.5 TO 32]", false),
            ("shadow.reported.temp:[31.5 TO *]", true),
            ("shadow.reported.temp:[* TO 20}", false),
            ("shadow.reported.mode:[a TO f]", true),
            ("shadow.reported.tags:b", true),
            ("shadow.reported.fw.v:1.2", true),
            ("shadow.reported.fw:*", true),
            ("shadow.reported.missing:*", false),
            ("shadow.reported.temp>30 AND shadow.desired.mode:eco", true),
            ("shadow.reported.temp>30 shadow.desired.mode:cool", false),
            ("shadow.desired.mode:cool OR thingName:sensor-7", true),
            ("NOT shadow.desired.mode:cool", true),
            ("NOT (shadow.desired.mode:eco OR thingName:x)", false),
            (
                "(thingName:x OR thingName:sensor-*) AND NOT connectivity.connected:false",
                true,
            ),
            ("thingName:x OR thingName:y AND thingName:sensor-7", false),
            ("(thingName:x OR thingName:y) OR thingName:sensor-7", true),
        ] {
            assert_eq!(check(query), want, "{query}");
        }
    }

    #[test]
    fn precedence() {
        let q = Query::parse("a OR b AND NOT c").unwrap_or_else(|e| panic!("{e}"));
        let t = |n: &str| {
            Query::Term(Term {
                field: Field::ThingName,
                test: Test::Equals(Literal::new(n.into(), false)),
            })
        };
        assert_eq!(
            q,
            Query::Or(
                Box::new(t("a")),
                Box::new(Query::And(
                    Box::new(t("b")),
                    Box::new(Query::Not(Box::new(t("c"))))
                ))
            )
        );
    }

    #[test]
    fn errors_say_where() {
        use ParseErrorKind::*;
        for (query, position, kind) in [
            ("", 0, Empty),
            ("   ", 3, Empty),
            ("thingName:", 10, MissingValue),
            ("bogus.field:1", 0, UnknownField),
            ("a AND (b OR c", 6, UnclosedParen),
            ("a)", 1, Unexpected(')')),
            ("thingName:1 AND", 15, UnexpectedEnd),
            ("shadow.reported.t:[1 2]", 21, ExpectedTo),
            ("shadow.reported.t:[1 TO 2", 25, UnclosedRange),
            ("thingName:\"abc", 10, UnclosedQuote),
            ("shadow.reported.t>a*", 18, BadComparison),
            ("shadow.name..x:1", 0, UnknownField),
            ("shadow.reported:1", 0, UnknownField),
            ("thingName=1", 9, Unexpected('=')),
        ] {
            assert_eq!(
                Query::parse(query),
                Err(ParseError { position, kind }),
                "{query}"
            );
        }
        let deep = format!("{}a{}", "(".repeat(40), ")".repeat(40));
        assert_eq!(
            Query::parse(&deep).map_err(|e| e.kind),
            Err(ParseErrorKind::TooDeep)
        );
        let nots = "NOT ".repeat(10_000) + "a";
        assert!(Query::parse(&nots).is_err());
    }

    #[test]
    fn glob_matches() {
        assert!(glob("a*", "abc"));
        assert!(glob("*c", "abc"));
        assert!(glob("a*c*e", "abxxcxxe"));
        assert!(glob("*", ""));
        assert!(!glob("a*d", "abc"));
        assert!(glob("a**b", "ab"));
        assert!(!glob("abc", "ab"));
    }
}

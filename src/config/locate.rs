//! Finds the line and column of a key path (`backends.gpu.url`, `models[1].backends`) in YAML text, so problems
//! found after parsing still point at the file. It follows block-style YAML; inside flow style (`{a: 1}`) it
//! reports the nearest enclosing key it could find.

/// One step of a key path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment {
    Key(String),
    Index(usize),
}

/// Parses `a.b[2].c` into segments.
pub fn parse_path(path: &str) -> Vec<Segment> {
    let mut out = Vec::new();
    for part in path.split('.') {
        let mut rest = part;
        if let Some(open) = rest.find('[') {
            let key = &rest[..open];
            if !key.is_empty() {
                out.push(Segment::Key(key.to_owned()));
            }
            rest = &rest[open..];
            while let Some(stripped) = rest.strip_prefix('[') {
                let Some(close) = stripped.find(']') else { break };
                if let Ok(i) = stripped[..close].parse() {
                    out.push(Segment::Index(i));
                }
                rest = &stripped[close + 1..];
            }
        } else if !rest.is_empty() {
            out.push(Segment::Key(rest.to_owned()));
        }
    }
    out
}

struct Line<'a> {
    number: usize,
    /// Column (0-based) where the content starts after indentation and any `- ` markers.
    column: usize,
    /// Column of the first `- ` marker, when the line starts a sequence item.
    dash: Option<usize>,
    content: &'a str,
}

fn lines(text: &str) -> Vec<Line<'_>> {
    let mut out = Vec::new();
    for (number, raw) in text.lines().enumerate() {
        let trimmed = raw.trim_start();
        if trimmed.is_empty() || trimmed.starts_with('#') || trimmed.starts_with("---") {
            continue;
        }
        let mut column = raw.len() - trimmed.len();
        let mut content = trimmed;
        let mut dash = None;
        while let Some(after) = content.strip_prefix("- ").or_else(|| (content == "-").then_some("")) {
            dash.get_or_insert(column);
            let inner = after.trim_start();
            column += content.len() - inner.len();
            content = inner;
        }
        out.push(Line { number: number + 1, column, dash, content });
    }
    out
}

fn key_of(content: &str) -> Option<&str> {
    let colon = content.find(':')?;
    let key = content[..colon].trim();
    let key = key.trim_matches('"').trim_matches('\'');
    let after = &content[colon + 1..];
    (after.is_empty() || after.starts_with(' ')).then_some(key)
}

/// Returns the 1-based (line, column) of the deepest part of `path` found in `text`.
pub fn locate(text: &str, path: &[Segment]) -> Option<(usize, usize)> {
    let all = lines(text);
    let (mut start, mut end) = (0usize, all.len());
    // Column of the parent node; children sit strictly to the right of it.
    let mut parent: Option<usize> = None;
    let mut found = None;
    for seg in path {
        let scope = &all[start..end];
        match seg {
            Segment::Key(key) => {
                let Some(child_col) = scope.iter().map(|l| l.column).filter(|c| parent.is_none_or(|p| *c > p)).min()
                else {
                    return found;
                };
                let pos = scope.iter().position(|l| l.column == child_col && key_of(l.content) == Some(key.as_str()));
                let Some(pos) = pos else { return found };
                let line = &scope[pos];
                found = Some((line.number, line.column + 1));
                let next = scope[pos + 1..]
                    .iter()
                    .position(|l| l.column <= child_col && l.dash.is_none_or(|d| d <= child_col));
                let (s, e) = (start + pos + 1, next.map_or(end, |n| start + pos + 1 + n));
                // The value may be on the same line (`key: {a: 1}`); then the scope is empty and search stops.
                start = s;
                end = e;
                parent = Some(child_col);
            }
            Segment::Index(i) => {
                let Some(dash_col) =
                    scope.iter().filter_map(|l| l.dash).filter(|d| parent.is_none_or(|p| *d >= p)).min()
                else {
                    return found;
                };
                let items: Vec<usize> =
                    scope.iter().enumerate().filter(|(_, l)| l.dash == Some(dash_col)).map(|(n, _)| n).collect();
                let Some(&pos) = items.get(*i) else { return found };
                let line = &scope[pos];
                found = Some((line.number, dash_col + 1));
                let next = items.get(i + 1).copied().unwrap_or(scope.len());
                // The item's first line belongs to the item: its keys sit at `line.column`.
                end = start + next;
                start += pos;
                parent = Some(dash_col);
            }
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "server:\n  listen: 1.2.3.4:80\nbackends:\n  gpu:\n    kind: openai\n    url: http://x\nmodels:\n  - id: a\n    backends: [gpu]\n  - id: b\n    backends:\n      - gpu\n";

    #[test]
    fn finds_nested_keys_and_list_items() {
        assert_eq!(locate(TEXT, &parse_path("server.listen")), Some((2, 3)));
        assert_eq!(locate(TEXT, &parse_path("backends.gpu.url")), Some((6, 5)));
        assert_eq!(locate(TEXT, &parse_path("models[1].backends")), Some((11, 5)));
        assert_eq!(locate(TEXT, &parse_path("models[0].id")), Some((8, 5)));
        assert_eq!(locate(TEXT, &parse_path("models[1].backends[0]")), Some((12, 7)));
    }

    #[test]
    fn reports_the_deepest_part_found() {
        assert_eq!(locate(TEXT, &parse_path("backends.gpu.nothing")), Some((4, 3)));
        assert_eq!(locate(TEXT, &parse_path("nothing")), None);
        assert_eq!(locate(TEXT, &parse_path("models[0].backends[0]")), Some((9, 5)), "flow style: the key");
    }
}

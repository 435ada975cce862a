//! A tiny XML well-formedness checker for the SVG the charts write. It is not a
//! full XML parser: enough to catch unbalanced tags, bad attribute quoting, stray
//! '<' or '&', and to list elements with their text.
#![allow(dead_code)]

#[derive(Debug, Clone)]
pub struct Element {
    pub name: String,
    pub attrs: Vec<(String, String)>,
    /// Unescaped text directly inside the element, trimmed.
    pub text: String,
}

impl Element {
    pub fn attr(&self, key: &str) -> Option<&str> {
        self.attrs
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

fn unescape(text: &str) -> Result<String, String> {
    let mut out = String::new();
    let mut rest = text;
    while let Some(amp) = rest.find('&') {
        out.push_str(&rest[..amp]);
        let semi = rest[amp..]
            .find(';')
            .ok_or_else(|| format!("unterminated entity in {text:?}"))?;
        let entity = &rest[amp + 1..amp + semi];
        out.push(match entity {
            "lt" => '<',
            "gt" => '>',
            "amp" => '&',
            "quot" => '"',
            "apos" => '\'',
            other => return Err(format!("unknown entity &{other};")),
        });
        rest = &rest[amp + semi + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

fn parse_attrs(body: &str) -> Result<Vec<(String, String)>, String> {
    let mut attrs = Vec::new();
    let mut rest = body.trim();
    while !rest.is_empty() {
        let eq = rest
            .find('=')
            .ok_or_else(|| format!("attribute without value in {body:?}"))?;
        let key = rest[..eq].trim().to_string();
        if key.is_empty() || key.contains(char::is_whitespace) {
            return Err(format!("bad attribute name {key:?}"));
        }
        let after = &rest[eq + 1..];
        let quote = after
            .chars()
            .next()
            .filter(|c| *c == '"' || *c == '\'')
            .ok_or_else(|| format!("unquoted attribute {key}"))?;
        let end = after[1..]
            .find(quote)
            .ok_or_else(|| format!("unterminated attribute {key}"))?;
        let value = unescape(&after[1..1 + end])?;
        if value.contains('<') && !after[1..1 + end].contains("&lt;") {
            return Err(format!("'<' in attribute {key}"));
        }
        attrs.push((key, value));
        rest = after[end + 2..].trim_start();
    }
    Ok(attrs)
}

/// Checks that `svg` is well-formed with a single <svg> root; returns its elements
/// in document order.
pub fn parse_svg(svg: &str) -> Result<Vec<Element>, String> {
    let mut elements: Vec<Element> = Vec::new();
    let mut open: Vec<usize> = Vec::new();
    let mut roots = 0;
    let mut rest = svg;
    loop {
        let Some(lt) = rest.find('<') else {
            if !rest.trim().is_empty() && open.is_empty() {
                return Err("text after the root element".into());
            }
            break;
        };
        let text = unescape(&rest[..lt])?;
        match open.last() {
            Some(&i) => elements[i].text.push_str(text.trim()),
            None if !text.trim().is_empty() => return Err("text outside the root".into()),
            None => {}
        }
        rest = &rest[lt..];
        if rest.starts_with("<?") {
            let end = rest.find("?>").ok_or("unterminated <?")?;
            rest = &rest[end + 2..];
            continue;
        }
        if rest.starts_with("<!--") {
            let end = rest.find("-->").ok_or("unterminated comment")?;
            rest = &rest[end + 3..];
            continue;
        }
        let gt = rest.find('>').ok_or("unterminated tag")?;
        let tag = &rest[1..gt];
        rest = &rest[gt + 1..];
        if let Some(name) = tag.strip_prefix('/') {
            let i = open.pop().ok_or_else(|| format!("stray </{name}>"))?;
            if elements[i].name != name.trim() {
                return Err(format!("</{name}> closes <{}>", elements[i].name));
            }
            continue;
        }
        let self_closing = tag.ends_with('/');
        let tag = tag.trim_end_matches('/');
        let name_end = tag.find(char::is_whitespace).unwrap_or(tag.len());
        let name = &tag[..name_end];
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == ':')
        {
            return Err(format!("bad tag name {name:?}"));
        }
        if open.is_empty() {
            roots += 1;
            if roots > 1 || name != "svg" {
                return Err(format!(
                    "root element must be a single <svg>, found <{name}>"
                ));
            }
        }
        elements.push(Element {
            name: name.to_string(),
            attrs: parse_attrs(&tag[name_end..])?,
            text: String::new(),
        });
        if !self_closing {
            open.push(elements.len() - 1);
        }
    }
    if let Some(&i) = open.last() {
        return Err(format!("<{}> never closed", elements[i].name));
    }
    if roots != 1 {
        return Err("no <svg> root".into());
    }
    Ok(elements)
}

pub fn texts(elements: &[Element]) -> Vec<String> {
    elements
        .iter()
        .filter(|e| e.name == "text")
        .map(|e| e.text.clone())
        .collect()
}

/// Polylines stroked in `colour` ("#0072B2"), split into (opaque, faint).
pub fn polylines_in(elements: &[Element], colour: &str) -> (usize, usize) {
    let lines = elements
        .iter()
        .filter(|e| e.name == "polyline" && e.attr("stroke") == Some(colour));
    let (mut opaque, mut faint) = (0, 0);
    for line in lines {
        let opacity: f64 = line
            .attr("opacity")
            .and_then(|o| o.parse().ok())
            .unwrap_or(1.0);
        if opacity >= 0.99 {
            opaque += 1;
        } else {
            faint += 1;
        }
    }
    (opaque, faint)
}
